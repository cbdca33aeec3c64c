import { SHUTDOWN_crash, SHUTDOWN_poweroff, SHUTDOWN_reboot, SHUTDOWN_soft_reset, SHUTDOWN_suspend, SHUTDOWN_watchdog } from '../abi/sched.js';

/** The SHUTDOWN_* reasons by number, named as xl names them. */
export const shutdownReasonNames: Record<number, string> = {
  [SHUTDOWN_poweroff]: 'poweroff',
  [SHUTDOWN_reboot]: 'reboot',
  [SHUTDOWN_suspend]: 'suspend',
  [SHUTDOWN_crash]: 'crash',
  [SHUTDOWN_watchdog]: 'watchdog',
  [SHUTDOWN_soft_reset]: 'soft_reset',
};

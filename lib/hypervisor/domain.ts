// struct domain: what the hypervisor keeps about one domain, in a
// SharedArrayBuffer of 32-bit words so every thread's hypercalls see the same
// state. The domain's memory is a second SharedArrayBuffer of 4 KiB pages.

import { MemoryViews, PAGE_SIZE } from './page.js';

export const MAX_VCPUS = 32; // vcpu_info slots in shared_info
export const MAX_EVTCHNS = 1024; // ports per domain (Xen's default max_event_channels is 1023)
export const MAX_GRANT_FRAMES = 64; // Xen's default gnttab_max_frames
export const GRANT_ENTRIES_PER_FRAME = PAGE_SIZE / 8; // grant_entry_v1 is 8 bytes
export const MAX_MAPTRACK = 8192; // grant mappings one domain may hold at once
export const NR_VIRQS = 24;
export const NR_HVM_PARAMS = 64;
/** Pages at the top of a domain's memory for the builder's special pages. */
export const SPECIAL_PAGES = 8;

/** Each vCPU's words in the control block (D.vcpus + vcpu * VCPU_WORDS + which). */
export const VCPU_WAKE = 0;
export const VCPU_ONLINE = 1;
export const VCPU_POLL = 2;
export const VCPU_BLOCKED = 3;
/** 1 while the vCPU's thread runs or polls, 0 while it sleeps: what HOST.awake counts. */
export const VCPU_AWAKE = 4;
export const VCPU_WORDS = 5;

/** Word indices in the control block. */
export const D = {
  lockEvtchn: 0,
  lockGnttab: 1,
  state: 2,
  shutdownReason: 3,
  nrPages: 4,
  maxVcpus: 5,
  sharedInfoGfn: 6,
  nrGrantFrames: 7,
  maxGrantFrames: 8,
  privileged: 9,
  domid: 10,
  nrMaptrack: 11,
  /** Milliseconds vCPU 0 spent held by a pause (not CPU time). */
  pausedMs: 12,
  /** The frame a suspending guest named (HYPERVISOR_suspend's third argument), 0 for none. */
  suspendRecord: 13,
  /**
   * Hypercalls the domain's thread is inside: a destroy waits for 0 before it
   * stops the thread. On a cache line of its own (words 0-15 hold the locks
   * other domains' threads take): only this domain's thread writes it.
   */
  inHypercall: 16,
  /** The Linux thread id of the domain's thread, 0 before it starts and after it ends (lib/hypervisor/affinity.ts). */
  threadId: 17,
  /** Two words: the CPUs 0-31 and 32-63 the domain may run on; 0 and 0 for every CPU. */
  affinity: 18,
  /** per vCPU, VCPU_WORDS each: wake word, online, poll port (0 = not polling), blocked (halted, waiting for an event), awake */
  vcpus: 32,
  /** two words (lo, hi) per HVM param */
  params: 32 + MAX_VCPUS * VCPU_WORDS,
  grantFrames: 32 + MAX_VCPUS * VCPU_WORDS + NR_HVM_PARAMS * 2,
  virqs: 32 + MAX_VCPUS * VCPU_WORDS + NR_HVM_PARAMS * 2 + MAX_GRANT_FRAMES,
  /** per port: state, remote domid or virq, remote port, notify vCPU */
  evtchns: 1024,
  /** per grant ref of this domain: pins, readers in the low half, writers in the high */
  active: 1024 + MAX_EVTCHNS * 4,
  /** per mapping this domain holds: flags (0 = free), granting domid, ref, generation */
  maptrack: 1024 + MAX_EVTCHNS * 4 + MAX_GRANT_FRAMES * GRANT_ENTRIES_PER_FRAME,
  words: 1024 + MAX_EVTCHNS * 4 + MAX_GRANT_FRAMES * GRANT_ENTRIES_PER_FRAME + MAX_MAPTRACK * 4,
} as const;


/** The host block's word that counts awake vCPUs (HOST.awake). */
export const HOST_AWAKE = 2;

/**
 * Values of the wake word. A kick sets KICKED and calls Atomics.notify only
 * when the word said SLEEPING: a vCPU that is running or polling (haltpoll)
 * sees the kick without the cost of a thread wake-up.
 */
export const WAKE_IDLE = 0;
export const WAKE_KICKED = 1;
export const WAKE_SLEEPING = 2;

export const DomainState = {
  free: 0,
  paused: 1,
  running: 2,
  shutdown: 3,
  dying: 4,
  dead: 5,
} as const;
export type DomainStateName = keyof typeof DomainState;

export const domainStateNames: readonly DomainStateName[] = ['free', 'paused', 'running', 'shutdown', 'dying', 'dead'];

/** What one thread holds of a domain: views on its control block and memory. */
export class Domain {
  readonly ctl: Int32Array;
  readonly mem: MemoryViews;

  constructor(
    readonly domid: number,
    readonly control: SharedArrayBuffer,
    readonly memory: SharedArrayBuffer,
    /** Which domain of this domid it is: a domid is used again once its last domain is gone. */
    readonly generation = 0,
    /** The host block, where this thread counts awake vCPUs; null where no one counts (one-thread tools). */
    readonly host: Int32Array | null = null,
  ) {
    this.ctl = new Int32Array(control);
    this.mem = new MemoryViews(memory);
  }

  get state(): DomainStateName {
    return domainStateNames[Atomics.load(this.ctl, D.state)] ?? 'dead';
  }

  /**
   * state === 'dead' without the name: a grant copy asks it of each side. A
   * plain load: a death just after the look is the same as one just before
   * it, and the Atomics call would cost about 9 ns more on each copy.
   */
  get dead(): boolean {
    const s = this.ctl[D.state]!;
    return !(s >= DomainState.free && s < DomainState.dead);
  }

  get nrPages(): number {
    return this.ctl[D.nrPages] ?? 0;
  }

  get privileged(): boolean {
    return this.ctl[D.privileged] === 1;
  }

  get maxVcpus(): number {
    return this.ctl[D.maxVcpus] ?? 1;
  }

  get sharedInfoGfn(): number {
    return Atomics.load(this.ctl, D.sharedInfoGfn);
  }

  vcpuWord(vcpu: number, which: number): number {
    return D.vcpus + vcpu * VCPU_WORDS + which;
  }

  /**
   * Mark a vCPU awake (1: its thread runs, polls, or was just woken) or
   * asleep (0), keeping HOST_AWAKE the count of awake vCPUs that halt
   * polling reads. A kick marks the vCPU it wakes, so a poller elsewhere
   * sees the CPUs fill before the woken thread runs.
   */
  setAwake(vcpu: number, on: 0 | 1): void {
    if (this.host !== null && Atomics.exchange(this.ctl, this.vcpuWord(vcpu, VCPU_AWAKE), on) !== on) {
      Atomics.add(this.host, HOST_AWAKE, on === 1 ? 1 : -1);
    }
  }

  /** A thread that ended holds no CPU: each of its vCPUs is marked asleep. */
  vcpusGone(): void {
    for (let v = 0; v < MAX_VCPUS; v++) this.setAwake(v, 0);
  }

  /** First GFN of the builder's special pages (shared info, grant frame 0, xenstore, console). */
  get specialBase(): number {
    return this.nrPages - SPECIAL_PAGES;
  }
}

/** The special pages a domain starts with, at the top of its memory. */
export const SpecialPage = {
  sharedInfo: 0,
  grantFrame0: 1,
  xenstore: 2,
  console: 3,
} as const;

export function newControlBlock(): SharedArrayBuffer {
  return new SharedArrayBuffer(D.words * 4);
}

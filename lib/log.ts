import createDebug from 'debug';

export type Log = createDebug.Debugger;

/** A `debug` logger named `xenpv:<component>[:<instance>]`. */
export function logger(component: string, instance?: string): Log {
  return createDebug(instance === undefined ? `xenpv:${component}` : `xenpv:${component}:${instance}`);
}

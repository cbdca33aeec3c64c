// A spinlock in a SharedArrayBuffer word, where Xen takes a spinlock. Hypercalls
// hold it for a few hundred nanoseconds, so spin first; sleep in Atomics.wait
// only if the holder was descheduled (two cores, many threads).

const UNLOCKED = 0;
const LOCKED = 1;
const CONTENDED = 2;
const SPINS = 200;

export function lock(words: Int32Array, index: number): void {
  for (let i = 0; i < SPINS; i++) {
    if (Atomics.compareExchange(words, index, UNLOCKED, LOCKED) === UNLOCKED) return;
  }
  // Mark contended so the unlocker knows to notify, then sleep until free.
  while (Atomics.exchange(words, index, CONTENDED) !== UNLOCKED) {
    Atomics.wait(words, index, CONTENDED, 10);
  }
}

export function unlock(words: Int32Array, index: number): void {
  if (Atomics.exchange(words, index, UNLOCKED) === CONTENDED) Atomics.notify(words, index, 1);
}

/** Run `fn` under the lock; the lock is released however `fn` leaves. */
export function locked<T>(words: Int32Array, index: number, fn: () => T): T {
  lock(words, index);
  try {
    return fn();
  } finally {
    unlock(words, index);
  }
}

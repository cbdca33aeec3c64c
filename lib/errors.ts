// One error family. `code` is stable and is what callers and tests match:
// Xen errno names (ENOENT, EACCES, EAGAIN, ...) for xenstore and hypercalls,
// GNTST_* names for grant operations, and a few xenpv names (ECONFIG, ...).

export type XenErrorShape = { name: string; code: string; message: string };

export class XenError extends Error {
  override readonly name = 'XenError';
  readonly code: string;

  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(`${code}: ${message}`, options);
    this.code = code;
  }

  /** The form an error takes across a worker boundary. */
  toJSON(): XenErrorShape {
    return { name: this.name, code: this.code, message: this.message };
  }

  static fromJSON(shape: XenErrorShape): XenError {
    const e = new XenError(shape.code, '');
    e.message = shape.message;
    return e;
  }
}

/** Turn anything thrown into the shape that crosses a worker boundary. */
export function errorShape(err: unknown): XenErrorShape {
  if (err instanceof XenError) return err.toJSON();
  if (err instanceof Error) {
    const raw: unknown = (err as { code?: unknown }).code;
    const code = typeof raw === 'string' ? raw : 'EIO';
    return { name: err.name, code, message: err.message };
  }
  return { name: 'Error', code: 'EIO', message: String(err) };
}

export function assert(condition: unknown, message: string): asserts condition {
  if (!condition) throw new XenError('EINVAL', message);
}

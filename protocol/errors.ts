import { Errno } from "./constants.ts";

/**
 * An error with the errno that goes into the reply header. Codecs throw it for
 * malformed bodies; server handlers throw it for refused requests; the
 * dispatcher turns it into an error reply. Anything else thrown inside a
 * handler becomes EIO, never a success reply.
 */
export class VfioUserError extends Error {
  readonly errno: number;
  readonly code: string;
  /** Which rule the refused message broke and where, when the thrower knows (see WireFact). */
  fact: WireFact | undefined;

  constructor(errno: number, message: string) {
    super(message);
    this.name = "VfioUserError";
    this.errno = errno;
    this.code = errnoName(errno);
  }

  /** Attaches (or replaces) the fact of this refusal; returns the error, for `throw fail.inval(...).with(...)`. */
  with(fact: WireFact): this {
    this.fact = fact;
    return this;
  }
}

/**
 * What a refusal knows about the message it refused: a stable rule id (the
 * conformance report's deviation id, e.g. "argsz-too-small") and the byte
 * offset of the offending field from the start of the message body (after
 * the 16-byte header, as the spec numbers fields). Codecs attach facts and
 * stay pure; the server decides what to do with them.
 */
export interface WireFact {
  readonly rule: string;
  /** Offset of the bad field in the body; absent when no single field is at fault. */
  readonly offset?: number;
}

export function errnoName(errno: number): string {
  for (const [name, value] of Object.entries(Errno)) {
    if (value === errno) return name;
  }
  return `E${errno}`;
}

/** Shorthand constructors so call sites read as the rule they enforce. */
export const fail = {
  inval: (msg: string) => new VfioUserError(Errno.EINVAL, msg),
  noent: (msg: string) => new VfioUserError(Errno.ENOENT, msg),
  exist: (msg: string) => new VfioUserError(Errno.EEXIST, msg),
  notsup: (msg: string) => new VfioUserError(Errno.ENOTSUP, msg),
  fault: (msg: string) => new VfioUserError(Errno.EFAULT, msg),
  toobig: (msg: string) => new VfioUserError(Errno.E2BIG, msg),
  busy: (msg: string) => new VfioUserError(Errno.EBUSY, msg),
  perm: (msg: string) => new VfioUserError(Errno.EPERM, msg),
  io: (msg: string) => new VfioUserError(Errno.EIO, msg),
  nospc: (msg: string) => new VfioUserError(Errno.ENOSPC, msg),
  again: (msg: string) => new VfioUserError(Errno.EAGAIN, msg),
  nomem: (msg: string) => new VfioUserError(Errno.ENOMEM, msg),
  nosys: (msg: string) => new VfioUserError(Errno.ENOSYS, msg),
};

/** The errno for anything caught: ours keeps its own, the rest become EIO. */
export function errnoOf(err: unknown): number {
  if (err instanceof VfioUserError) return err.errno;
  return Errno.EIO;
}

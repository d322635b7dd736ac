/**
 * Guest memory shared by fd (DMA_MAP with an fd): mmap'd as one or more
 * windows, each an external Buffer over its own MAP_SHARED mapping.
 *
 * Why windows: Node aborts the process when one external Buffer exceeds
 * 4 GiB, and a DMA region can be the whole guest RAM. Windows are 1 GiB by
 * default (DEFAULT_WINDOW_SIZE): well below the limit, large enough that
 * nearly every access falls in one window (zero-copy view()), and a 64 GiB
 * guest is only 64 mappings. Window i covers region bytes
 * [i * windowSize, (i + 1) * windowSize) and maps fd offset
 * `offset + i * windowSize` (the addon handles offsets that are not page
 * aligned).
 *
 * Safety:
 * - unmap() detaches every window's ArrayBuffer before munmap, so Buffers
 *   handed out by view() become empty instead of pointing at unmapped
 *   memory; read/write/view after unmap() throw.
 * - A read-only mapping (writable = false) refuses write(). A view() of it
 *   must never be written: that is a SIGSEGV, not an exception.
 * - Touching pages beyond the end of the fd's file is a SIGBUS: callers
 *   check `offset + length` against native.fstatSize(fd) before mapping.
 */
import { errnoError, native } from "./native.ts";

export const DEFAULT_WINDOW_SIZE = 1 << 30; // 1 GiB
/** Largest window allowed (Node's limit for one external Buffer is 4 GiB). */
export const MAX_WINDOW_SIZE = 2 ** 31;

export class MappedMemory {
  /** Bytes in the region. */
  readonly length: bigint;
  readonly writable: boolean;
  readonly windowSize: number;
  private windows: Buffer[];
  private arrayBuffers: ArrayBuffer[];
  private readonly size: number;
  private _unmapped = false;

  /** @internal use mapFd() */
  constructor(length: bigint, writable: boolean, windowSize: number, arrayBuffers: ArrayBuffer[]) {
    this.length = length;
    this.size = Number(length);
    this.writable = writable;
    this.windowSize = windowSize;
    this.arrayBuffers = arrayBuffers;
    this.windows = arrayBuffers.map((ab) => Buffer.from(ab));
  }

  get unmapped(): boolean {
    return this._unmapped;
  }

  get windowCount(): number {
    return this.windows.length;
  }

  /** A copy of [offset, offset + length); may span windows. */
  read(offset: bigint, length: number): Buffer {
    const start = this.check(offset, length);
    if (length === 0) return Buffer.alloc(0);
    const ws = this.windowSize;
    let w = Math.floor(start / ws);
    let inner = start - w * ws;
    if (inner + length <= ws) {
      return Buffer.from(this.windows[w]!.subarray(inner, inner + length));
    }
    const out = Buffer.allocUnsafe(length);
    let done = 0;
    while (done < length) {
      const win = this.windows[w]!;
      const n = Math.min(length - done, win.length - inner);
      win.copy(out, done, inner, inner + n);
      done += n;
      w++;
      inner = 0;
    }
    return out;
  }

  /** Copies data to [offset, offset + data.length); may span windows. */
  write(offset: bigint, data: Uint8Array): void {
    const length = data.byteLength;
    const start = this.check(offset, length);
    if (!this.writable) {
      const e: NodeJS.ErrnoException = new Error("write to a read-only mapping");
      e.code = "EACCES";
      throw e;
    }
    const ws = this.windowSize;
    let w = Math.floor(start / ws);
    let inner = start - w * ws;
    let done = 0;
    while (done < length) {
      const win = this.windows[w]!;
      const n = Math.min(length - done, win.length - inner);
      win.set(done === 0 && n === length ? data : data.subarray(done, done + n), inner);
      done += n;
      w++;
      inner = 0;
    }
  }

  /**
   * Zero-copy Buffer over [offset, offset + length), valid until unmap()
   * (then it becomes empty). RangeError when the range crosses a window
   * boundary: use read()/write() then.
   */
  view(offset: bigint, length: number): Buffer {
    const start = this.check(offset, length);
    const ws = this.windowSize;
    const w = Math.floor(start / ws);
    const inner = start - w * ws;
    if (inner + length > ws && length > 0) {
      throw new RangeError(
        `view [0x${offset.toString(16)}, +0x${length.toString(16)}) crosses a ${ws}-byte mapping window`,
      );
    }
    const win = this.windows[Math.min(w, this.windows.length - 1)]!;
    return win.subarray(inner, inner + length);
  }

  /** Unmaps every window; idempotent. Views handed out become empty. */
  unmap(): void {
    if (this._unmapped) return;
    this._unmapped = true;
    this.windows = [];
    const abs = this.arrayBuffers;
    this.arrayBuffers = [];
    for (const ab of abs) native.munmap(ab);
  }

  /** Validates the range and returns its start as a Number. */
  private check(offset: bigint, length: number): number {
    if (this._unmapped) {
      const e: NodeJS.ErrnoException = new Error("access to unmapped memory");
      e.code = "ERR_UNMAPPED";
      throw e;
    }
    if (typeof offset !== "bigint") throw new TypeError("offset must be a bigint");
    if (!Number.isSafeInteger(length) || length < 0) throw new RangeError(`bad length ${length}`);
    if (offset < 0n || offset > this.length || Number(offset) + length > this.size) {
      throw new RangeError(
        `range [0x${offset.toString(16)}, +0x${length.toString(16)}) outside mapping of 0x${this.length.toString(16)} bytes`,
      );
    }
    return Number(offset);
  }
}

/**
 * Maps [offset, offset + length) of fd (MAP_SHARED; read-only unless
 * writable). The fd may be closed afterwards: the mapping stays. Throws an
 * errno Error when mmap fails (nothing stays mapped then).
 */
export function mapFd(
  fd: number,
  offset: bigint,
  length: bigint,
  writable: boolean,
  windowSize: number = DEFAULT_WINDOW_SIZE,
): MappedMemory {
  if (!Number.isSafeInteger(windowSize) || windowSize <= 0 || windowSize > MAX_WINDOW_SIZE) {
    throw new RangeError(`windowSize must be an integer in 1..${MAX_WINDOW_SIZE}`);
  }
  if (offset < 0n || length <= 0n || length > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new RangeError(`cannot map offset ${offset} length ${length}`);
  }
  const ws = BigInt(windowSize);
  const abs: ArrayBuffer[] = [];
  for (let at = 0n; at < length; at += ws) {
    const n = length - at < ws ? length - at : ws;
    const r = native.mmap(fd, offset + at, n, writable);
    if (typeof r === "number") {
      for (const ab of abs) native.munmap(ab);
      throw errnoError(r, "mmap");
    }
    abs.push(r);
  }
  return new MappedMemory(length, writable, windowSize, abs);
}

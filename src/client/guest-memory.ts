/**
 * Guest RAM for a client acting as the VMM: a memfd the client maps and
 * shares with the server by DMA_MAP (the server maps the same pages, so the
 * device DMAs straight into it), placed at an IOVA.
 *
 * The client is also the guest CPU: its writes go through `write()`, which
 * keeps a dirty bitmap of its own while tracking is on (what KVM's dirty log
 * is to QEMU). Writes the device makes are tracked by the server
 * (DMA_LOGGING_*); a migration merges both.
 */
import { randomFillSync } from "node:crypto";
import { mapFd, type MappedMemory } from "../transport/mapping.ts";
import { errnoError, native } from "../transport/native.ts";
import type { VfioUserClient } from "./client.ts";

export const GUEST_PAGE_SIZE = 4096;
/** Chunk for bulk copies and comparisons; never crosses a mapping window. */
const CHUNK = 1 << 20;

export interface GuestMemoryOptions {
  /** IOVA of the first byte (default 0). */
  iova?: bigint;
  /** memfd name, for /proc/PID/fd (default "guest-ram"). */
  name?: string;
}

export class GuestMemory {
  readonly fd: number;
  readonly size: bigint;
  readonly iova: bigint;
  readonly pageSize = GUEST_PAGE_SIZE;
  readonly pages: number;
  private readonly mem: MappedMemory;
  /** One bit per page while the CPU's writes are tracked. */
  private cpuDirty: Uint8Array | null = null;
  private closed = false;

  /** A fresh zero-filled memfd of `size` bytes (a multiple of 4 KiB), mapped read-write. */
  static create(size: bigint, opts: GuestMemoryOptions = {}): GuestMemory {
    if (size <= 0n || size % BigInt(GUEST_PAGE_SIZE) !== 0n) throw new RangeError(`guest RAM size ${size} is not a positive multiple of 4096`);
    const fd = native.memfdCreate(opts.name ?? "guest-ram", size);
    if (fd < 0) throw errnoError(fd, "memfd_create");
    try {
      return new GuestMemory(fd, size, opts.iova ?? 0n, mapFd(fd, 0n, size, true));
    } catch (err) {
      native.close(fd);
      throw err;
    }
  }

  private constructor(fd: number, size: bigint, iova: bigint, mem: MappedMemory) {
    this.fd = fd;
    this.size = size;
    this.iova = iova;
    this.mem = mem;
    this.pages = Number(size / BigInt(GUEST_PAGE_SIZE));
  }

  /** DMA_MAPs the whole memory with its fd on `client` (readable and writable by the device). */
  async mapInto(client: VfioUserClient): Promise<void> {
    await client.dmaMap({ iova: this.iova, size: this.size, fd: this.fd, offset: 0n, readable: true, writable: true });
  }

  /** A copy of `length` bytes at guest offset `offset`. */
  read(offset: bigint | number, length: number): Buffer {
    return this.mem.read(BigInt(offset), length);
  }

  /** A guest CPU store: written, and logged while tracking is on. */
  write(offset: bigint | number, data: Uint8Array): void {
    const at = BigInt(offset);
    this.mem.write(at, data);
    this.markCpuDirty(Number(at), data.length);
  }

  /** Random bytes over [offset, offset + length), as guest CPU stores. */
  randomize(offset: number, length: number): void {
    for (let done = 0; done < length; ) {
      const at = offset + done;
      // stay inside one 1 MiB-aligned chunk so no view crosses a mapping window
      const n = Math.min(length - done, CHUNK - (at % CHUNK));
      randomFillSync(this.mem.view(BigInt(at), n));
      done += n;
    }
    this.markCpuDirty(offset, length);
  }

  /** Start logging guest CPU writes (the log starts clean). */
  startCpuTracking(): void {
    this.cpuDirty = new Uint8Array(Math.ceil(this.pages / 8));
  }

  stopCpuTracking(): void {
    this.cpuDirty = null;
  }

  /** Pages the CPU wrote since the last call (the log is cleared), in page order. */
  takeCpuDirtyPages(): number[] {
    const bits = this.cpuDirty;
    if (!bits) return [];
    const out = pagesOfBitmap(bits, this.pages);
    bits.fill(0);
    return out;
  }

  private markCpuDirty(offset: number, length: number): void {
    const bits = this.cpuDirty;
    if (!bits || length <= 0) return;
    const last = Math.floor((offset + length - 1) / GUEST_PAGE_SIZE);
    for (let p = Math.floor(offset / GUEST_PAGE_SIZE); p <= last; p++) bits[p >>> 3]! |= 1 << (p & 7);
  }

  /** Copies pages (numbers relative to this memory) into `dst` at the same offsets. */
  copyPagesTo(dst: GuestMemory, pages: Iterable<number>): number {
    let n = 0;
    let runStart = -1;
    let runLen = 0;
    const flush = (): void => {
      if (runLen > 0) this.copyRangeTo(dst, runStart * GUEST_PAGE_SIZE, runLen * GUEST_PAGE_SIZE);
    };
    for (const p of pages) {
      if (p < 0 || p >= this.pages) throw new RangeError(`page ${p} outside guest RAM of ${this.pages} pages`);
      if (runLen > 0 && p === runStart + runLen && runLen < CHUNK / GUEST_PAGE_SIZE) {
        runLen++;
      } else {
        flush();
        runStart = p;
        runLen = 1;
      }
      n++;
    }
    flush();
    return n;
  }

  /** Copies everything into `dst`. */
  copyAllTo(dst: GuestMemory): void {
    this.copyRangeTo(dst, 0, Number(this.size));
  }

  private copyRangeTo(dst: GuestMemory, offset: number, length: number): void {
    if (dst.size < this.size) throw new RangeError("destination guest RAM is smaller");
    for (let done = 0; done < length; ) {
      const at = offset + done;
      // stay inside one 1 MiB-aligned chunk so no view crosses a mapping window
      const n = Math.min(length - done, CHUNK - (at % CHUNK));
      dst.mem.view(BigInt(at), n).set(this.mem.view(BigInt(at), n));
      done += n;
    }
  }

  /** Byte-for-byte comparison; the first differing page, or -1 when equal. */
  firstDifference(other: GuestMemory): number {
    if (other.size !== this.size) return 0;
    const size = Number(this.size);
    for (let at = 0; at < size; at += CHUNK) {
      const n = Math.min(CHUNK, size - at);
      const a = this.mem.view(BigInt(at), n);
      const b = other.mem.view(BigInt(at), n);
      if (!a.equals(b)) {
        for (let p = 0; p < n; p += GUEST_PAGE_SIZE) {
          if (!a.subarray(p, p + GUEST_PAGE_SIZE).equals(b.subarray(p, p + GUEST_PAGE_SIZE))) return (at + p) / GUEST_PAGE_SIZE;
        }
      }
    }
    return -1;
  }

  equals(other: GuestMemory): boolean {
    return this.firstDifference(other) < 0;
  }

  /** Unmaps and closes the memfd (a server that mapped it keeps its own mapping). */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.mem.unmap();
    native.close(this.fd);
  }
}

/** Page numbers set in a dirty bitmap (bit n = page n, LSB first in each byte), in order. */
export function pagesOfBitmap(bitmap: Uint8Array, pageLimit = bitmap.length * 8): number[] {
  const out: number[] = [];
  for (let i = 0; i < bitmap.length; i++) {
    let b = bitmap[i]!;
    while (b !== 0) {
      const low = b & -b;
      const page = i * 8 + (31 - Math.clz32(low));
      if (page < pageLimit) out.push(page);
      b ^= low;
    }
  }
  return out;
}

/**
 * Dirty-page tracking of device DMA writes, for VFIO_DEVICE_FEATURE_DMA_LOGGING_*
 * (spec: include/uapi/linux/vfio.h, "DMA logging allows a device to internally
 * record what DMAs the device is initiating ... Only DMA WRITEs are logged").
 *
 * Storage: one bit per tracking page, page p at byte p/8, bit p%8. That byte
 * order is exactly the report format ("bitmap is a pointer to an array of
 * u64s"; bit i of little-endian u64 word w is page w*64+i, i.e. byte w*8+i/8,
 * bit i%8), on any host endianness. The same buffer is also viewed as 32-bit
 * words, used only where byte order does not matter: skipping zero words and
 * counting bits. The buffer is padded to whole u64 words.
 *
 * REPORT (spec: "read back and clear the device DMA log ... During querying
 * the log is cleared for the IOVA range"):
 * - same page size, range starting on a byte of the bitmap: one memcpy plus
 *   one fill, so 16 GiB at 4 KiB (4M pages, 512 KiB of bitmap) costs about
 *   what copying 512 KiB costs, whatever the dirty ratio;
 * - same page size, other start: a shifted byte copy;
 * - larger report page: a report bit is set if any tracking page under it is
 *   dirty (the scan jumps to the next report page after a hit);
 * - smaller report page: every report bit inside a dirty tracking page is set
 *   (spec: "possibly by replicating bits if the internal page size is lower
 *   than requested").
 *
 * Clearing with a tracking page larger than the report page: a tracking page
 * only partly inside the reported range stays dirty. Its dirty bit says "some
 * byte of this page was written", and the part not reported yet may hold that
 * write; clearing it would lose the write, while keeping it costs at most one
 * redundant copy of the other part in the next round. Tracking pages wholly
 * inside the range are cleared, so clearing is exact when the report page is
 * no smaller than the tracking page.
 *
 * Indices are Numbers below 2^32 (pages per bitmap and bits per report are
 * capped at 2^32), which keeps `>>>` and `&` exact on them.
 */
import { fail } from "../../protocol/errors.ts";
import { U64_MAX } from "../../protocol/u64.ts";

/** Hard ceiling on tracking pages per bitmap: indices stay below 2^32. */
export const MAX_TRACKED_PAGES = 2 ** 32;
/** Default ceiling: 2^30 pages = 128 MiB of bitmap = 4 TiB of IOVA at 4 KiB. */
export const DEFAULT_MAX_TRACKED_PAGES = 2 ** 30;
/** Largest REPORT bitmap returned (2^32 bits). */
export const MAX_REPORT_BYTES = 2 ** 29;
/** Largest tracking page size (keeps bit arithmetic on Numbers exact). */
export const MAX_TRACKING_PAGE_SIZE = 1n << 48n;

export interface DirtyBitmapOptions {
  /** Refuse ranges needing more tracking pages than this (ENOMEM). */
  readonly maxPages?: number;
}

export interface IovaRange {
  readonly iova: bigint;
  readonly length: bigint;
}

export function isPowerOfTwo(value: bigint): boolean {
  return value > 0n && (value & (value - 1n)) === 0n;
}

function log2(powerOfTwo: bigint): bigint {
  return BigInt(powerOfTwo.toString(2).length - 1);
}

function hex(value: bigint): string {
  return `0x${value.toString(16)}`;
}

/** Index of the lowest set bit of a non-zero 32-bit value. */
function ctz(x: number): number {
  return 31 - Math.clz32(x & -x);
}

function popcount32(x: number): number {
  x = x - ((x >>> 1) & 0x55555555);
  x = (x & 0x33333333) + ((x >>> 2) & 0x33333333);
  x = (x + (x >>> 4)) & 0x0f0f0f0f;
  return Math.imul(x, 0x01010101) >>> 24;
}

/** Set bits [start, end) of a byte-ordered bitmap. */
function setBits(bytes: Uint8Array, start: number, end: number): void {
  if (start >= end) return;
  const first = start >>> 3;
  const last = (end - 1) >>> 3;
  const headMask = (0xff << (start & 7)) & 0xff;
  const tailMask = 0xff >>> (7 - ((end - 1) & 7));
  if (first === last) {
    bytes[first]! |= headMask & tailMask;
    return;
  }
  bytes[first]! |= headMask;
  if (last > first + 1) bytes.fill(0xff, first + 1, last);
  bytes[last]! |= tailMask;
}

/** Clear bits [start, end) of a byte-ordered bitmap. */
function clearBits(bytes: Uint8Array, start: number, end: number): void {
  if (start >= end) return;
  const first = start >>> 3;
  const last = (end - 1) >>> 3;
  const headMask = (0xff << (start & 7)) & 0xff;
  const tailMask = 0xff >>> (7 - ((end - 1) & 7));
  if (first === last) {
    bytes[first]! &= ~(headMask & tailMask);
    return;
  }
  bytes[first]! &= ~headMask;
  if (last > first + 1) bytes.fill(0, first + 1, last);
  bytes[last]! &= ~tailMask;
}

/** Bytes of a report bitmap of `bits` bits: whole u64 words. */
function reportBytes(bits: number): number {
  return Math.ceil(bits / 64) * 8;
}

/**
 * Dirty log of one IOVA range at one tracking page size.
 */
export class DirtyBitmap {
  readonly iova: bigint;
  readonly length: bigint;
  readonly pageSize: bigint;
  /** Number of tracking pages. */
  readonly pages: number;
  readonly #end: bigint;
  readonly #shift: bigint;
  readonly #bytes: Uint8Array;
  readonly #words: Uint32Array;

  constructor(iova: bigint, length: bigint, pageSize: bigint, options: DirtyBitmapOptions = {}) {
    if (!isPowerOfTwo(pageSize) || pageSize > MAX_TRACKING_PAGE_SIZE) {
      throw fail.inval(`dirty tracking page size ${hex(pageSize)} is not a power of two up to ${hex(MAX_TRACKING_PAGE_SIZE)}`);
    }
    if (iova < 0n || length <= 0n || iova + length - 1n > U64_MAX) {
      throw fail.inval(`dirty tracking range ${hex(iova)}+${hex(length)} is empty or outside the u64 space`);
    }
    // spec (vfio_main.c, DMA_LOGGING_START): ranges aligned to the page size.
    if (iova % pageSize !== 0n || length % pageSize !== 0n) {
      throw fail.inval(`dirty tracking range ${hex(iova)}+${hex(length)} is not aligned to page size ${hex(pageSize)}`);
    }
    const maxPages = Math.min(options.maxPages ?? DEFAULT_MAX_TRACKED_PAGES, MAX_TRACKED_PAGES);
    const shift = log2(pageSize);
    const pages = length >> shift;
    if (pages > BigInt(maxPages)) {
      throw fail.nomem(`dirty tracking of ${pages} pages exceeds the limit of ${maxPages} pages`);
    }
    this.iova = iova;
    this.length = length;
    this.pageSize = pageSize;
    this.pages = Number(pages);
    this.#end = iova + length;
    this.#shift = shift;
    const buffer = new ArrayBuffer(reportBytes(this.pages));
    this.#bytes = new Uint8Array(buffer);
    this.#words = new Uint32Array(buffer);
  }

  /** One past the last tracked address. */
  get end(): bigint {
    return this.#end;
  }

  /** Record a device write of `len` bytes at `addr`; the part outside the range is ignored. */
  markDirty(addr: bigint, len: bigint): void {
    if (len <= 0n) return;
    const start = addr > this.iova ? addr : this.iova;
    const stop = addr + len < this.#end ? addr + len : this.#end;
    if (start >= stop) return;
    const first = Number((start - this.iova) >> this.#shift);
    const last = Number((stop - 1n - this.iova) >> this.#shift);
    if (first === last) this.#bytes[first >>> 3]! |= 1 << (first & 7);
    else setBits(this.#bytes, first, last + 1);
  }

  /** Whether the tracking page holding `addr` is dirty (false outside the range). */
  isDirty(addr: bigint): boolean {
    if (addr < this.iova || addr >= this.#end) return false;
    const page = Number((addr - this.iova) >> this.#shift);
    return ((this.#bytes[page >>> 3]! >> (page & 7)) & 1) === 1;
  }

  /** Number of dirty tracking pages. */
  countDirty(): number {
    let n = 0;
    const words = this.#words;
    for (let i = 0; i < words.length; i++) {
      const w = words[i]!;
      if (w !== 0) n += popcount32(w);
    }
    return n;
  }

  clear(): void {
    this.#bytes.fill(0);
  }

  /**
   * DMA_LOGGING_REPORT for [iova, iova+length) at `pageSize` (any power of
   * two; spec: "does not have to match the value given to
   * VFIO_DEVICE_FEATURE_DMA_LOGGING_START"). Returns the bitmap as whole
   * little-endian u64 words and clears what it reported (see the file
   * comment for partly reported tracking pages). The range must be aligned
   * to `pageSize` and inside the tracked range: EINVAL otherwise.
   */
  report(iova: bigint, length: bigint, pageSize: bigint): Uint8Array {
    const bits = this.#checkReport(iova, length, pageSize);
    const out = new Uint8Array(reportBytes(bits));
    const shift = this.#shift;
    if (pageSize === this.pageSize) {
      this.#copySame(Number((iova - this.iova) >> shift), bits, out);
    } else if (pageSize > this.pageSize) {
      this.#copyCoarser(Number((iova - this.iova) >> shift), bits, Number(pageSize >> shift), out);
    } else {
      const offset = iova - this.iova;
      this.#copyFiner(Number(offset >> shift), Number((offset & (this.pageSize - 1n)) / pageSize), bits, Number(this.pageSize / pageSize), out);
    }
    return out;
  }

  #checkReport(iova: bigint, length: bigint, pageSize: bigint): number {
    if (!isPowerOfTwo(pageSize)) throw fail.inval(`report page size ${hex(pageSize)} is not a power of two`);
    if (length <= 0n) throw fail.inval("report length is zero");
    if (iova % pageSize !== 0n || length % pageSize !== 0n) {
      throw fail.inval(`report range ${hex(iova)}+${hex(length)} is not aligned to page size ${hex(pageSize)}`);
    }
    if (iova < this.iova || iova + length > this.#end) {
      throw fail.inval(`report range ${hex(iova)}+${hex(length)} is outside the tracked range ${hex(this.iova)}+${hex(this.length)}`);
    }
    const bits = length / pageSize;
    if (bits > BigInt(MAX_REPORT_BYTES) * 8n) {
      throw fail.toobig(`report of ${bits} pages exceeds ${MAX_REPORT_BYTES} bytes of bitmap`);
    }
    return Number(bits);
  }

  /** Same page size: bits [p0, p0+bits) move to out bits [0, bits). */
  #copySame(p0: number, bits: number, out: Uint8Array): void {
    const bytes = this.#bytes;
    const src = p0 >>> 3;
    const whole = Math.floor(bits / 8);
    const rem = bits & 7;
    const s = p0 & 7;
    if (s === 0) {
      out.set(bytes.subarray(src, src + whole));
      bytes.fill(0, src, src + whole);
      if (rem !== 0) {
        const mask = (1 << rem) - 1;
        out[whole] = bytes[src + whole]! & mask;
        bytes[src + whole]! &= ~mask;
      }
      return;
    }
    const n = Math.ceil(bits / 8);
    for (let k = 0; k < n; k++) {
      const lo = bytes[src + k]!;
      const hi = src + k + 1 < bytes.length ? bytes[src + k + 1]! : 0;
      if ((lo | hi) === 0) continue;
      out[k] = ((lo >>> s) | (hi << (8 - s))) & 0xff;
    }
    if (rem !== 0) out[n - 1]! &= (1 << rem) - 1;
    clearBits(bytes, p0, p0 + bits);
  }

  /** Report page = `ratio` tracking pages; tracking pages [p0, p0+bits*ratio). */
  #copyCoarser(p0: number, bits: number, ratio: number, out: Uint8Array): void {
    const end = p0 + bits * ratio;
    let p = this.#nextSetBit(p0, end);
    while (p >= 0) {
      const bit = Math.floor((p - p0) / ratio);
      out[bit >>> 3]! |= 1 << (bit & 7);
      p = this.#nextSetBit(p0 + (bit + 1) * ratio, end);
    }
    clearBits(this.#bytes, p0, end);
  }

  /**
   * Tracking page = `ratio` report pages. The range starts `sub` report pages
   * into tracking page `p0`.
   */
  #copyFiner(p0: number, sub: number, bits: number, ratio: number, out: Uint8Array): void {
    const lastPage = p0 + Math.floor((sub + bits - 1) / ratio);
    let p = this.#nextSetBit(p0, lastPage + 1);
    while (p >= 0) {
      const from = (p - p0) * ratio - sub;
      setBits(out, Math.max(0, from), Math.min(bits, from + ratio));
      p = this.#nextSetBit(p + 1, lastPage + 1);
    }
    // Only tracking pages wholly inside the range are cleared.
    const firstWhole = sub === 0 ? p0 : p0 + 1;
    const endWhole = (sub + bits) % ratio === 0 ? lastPage + 1 : lastPage;
    clearBits(this.#bytes, firstWhole, endWhole);
  }

  /** Lowest dirty page in [from, end), or -1. Skips zero 32-bit words. */
  #nextSetBit(from: number, end: number): number {
    const bytes = this.#bytes;
    const words = this.#words;
    let i = from;
    while (i < end) {
      if ((i & 31) === 0 && words[i >>> 5] === 0) {
        i += 32;
        continue;
      }
      const b = bytes[i >>> 3]! >>> (i & 7);
      if (b === 0) {
        i += 8 - (i & 7);
        continue;
      }
      const hit = i + ctz(b);
      return hit < end ? hit : -1;
    }
    return -1;
  }
}

/**
 * The dirty log of one DMA_LOGGING_START: one bitmap per range, all at the
 * same tracking page size. Ranges must not overlap (spec: vfio_main.c refuses
 * overlapping ranges with EINVAL).
 *
 * A REPORT must lie inside one tracked range, else EINVAL. The kernel core
 * passes the report range to the driver unchanged; the pds driver refuses a
 * range that leaves the region holding its start, and QEMU asks per memory
 * section inside the ranges it started. Reporting an untracked gap as clean
 * would hide writes, so a range crossing a gap or a boundary is refused
 * rather than stitched together.
 */
export class DirtyLog {
  readonly pageSize: bigint;
  /** Sorted by IOVA. */
  readonly #maps: DirtyBitmap[];

  constructor(ranges: readonly IovaRange[], pageSize: bigint, options: DirtyBitmapOptions = {}) {
    if (ranges.length === 0) throw fail.inval("dirty logging needs at least one range");
    const sorted = [...ranges].sort((a, b) => (a.iova < b.iova ? -1 : a.iova > b.iova ? 1 : 0));
    for (let i = 1; i < sorted.length; i++) {
      const prev = sorted[i - 1]!;
      if (prev.iova + prev.length > sorted[i]!.iova) {
        throw fail.inval(`dirty logging ranges overlap at ${hex(sorted[i]!.iova)}`);
      }
    }
    let budget = Math.min(options.maxPages ?? DEFAULT_MAX_TRACKED_PAGES, MAX_TRACKED_PAGES);
    const maps: DirtyBitmap[] = [];
    for (const r of sorted) {
      const map = new DirtyBitmap(r.iova, r.length, pageSize, { maxPages: budget });
      budget -= map.pages;
      maps.push(map);
    }
    this.pageSize = pageSize;
    this.#maps = maps;
  }

  get ranges(): IovaRange[] {
    return this.#maps.map((m) => ({ iova: m.iova, length: m.length }));
  }

  /** Record a device write; routed to every range it touches, ignored outside them. */
  markDirty(addr: bigint, len: bigint): void {
    if (len <= 0n) return;
    const maps = this.#maps;
    if (maps.length === 1) {
      maps[0]!.markDirty(addr, len);
      return;
    }
    const stop = addr + len;
    for (let i = this.#firstEndingAfter(addr); i < maps.length && maps[i]!.iova < stop; i++) {
      maps[i]!.markDirty(addr, len);
    }
  }

  /** DMA_LOGGING_REPORT; the range must lie inside one tracked range. */
  report(iova: bigint, length: bigint, pageSize: bigint): Uint8Array {
    const i = this.#firstEndingAfter(iova);
    const map = this.#maps[i];
    if (map === undefined || iova < map.iova || iova + length > map.end) {
      throw fail.inval(`report range ${hex(iova)}+${hex(length)} is not inside one tracked range`);
    }
    return map.report(iova, length, pageSize);
  }

  isDirty(addr: bigint): boolean {
    const map = this.#maps[this.#firstEndingAfter(addr)];
    return map !== undefined && map.isDirty(addr);
  }

  countDirty(): number {
    let n = 0;
    for (const m of this.#maps) n += m.countDirty();
    return n;
  }

  clear(): void {
    for (const m of this.#maps) m.clear();
  }

  /** Index of the first bitmap whose end is above `addr` (maps.length if none). */
  #firstEndingAfter(addr: bigint): number {
    const maps = this.#maps;
    let lo = 0;
    let hi = maps.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (maps[mid]!.end <= addr) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }
}

/**
 * The client's DMA regions (DMA_MAP / DMA_UNMAP): which IOVA ranges the
 * device may touch, and how (an mmap'd fd, or messages over the socket).
 */
import { fail } from "../../protocol/errors.ts";
import { U64_MAX } from "../../protocol/u64.ts";

/** Bytes of a mapped fd, as the transport's mapping module provides them. */
export interface MemoryWindow {
  read(offset: bigint, length: number): Buffer;
  write(offset: bigint, data: Uint8Array): void;
  unmap(): void;
}

export interface DmaRegion {
  readonly iova: bigint;
  readonly size: bigint;
  /** Offset of the region in the fd (meaningless without one). */
  readonly offset: bigint;
  readonly readable: boolean;
  readonly writable: boolean;
  /** Present when the client passed an fd and it was mapped. */
  readonly memory: MemoryWindow | null;
}

export class DmaTable {
  /** Sorted by iova; regions never overlap. */
  private readonly list: DmaRegion[] = [];

  constructor(private readonly maxMaps: number) {}

  get count(): number {
    return this.list.length;
  }

  regions(): readonly DmaRegion[] {
    return this.list;
  }

  /** Validates before anything is mapped, so a refused map costs nothing. */
  checkAdd(iova: bigint, size: bigint): void {
    if (size === 0n) throw fail.inval("DMA region of size 0");
    if (iova + size - 1n > U64_MAX) throw fail.inval("DMA region wraps past 2^64");
    if (this.list.length >= this.maxMaps) throw fail.nospc(`more than ${this.maxMaps} DMA regions`);
    const end = iova + size;
    for (const r of this.list) {
      if (iova < r.iova + r.size && r.iova < end) {
        // spec: overlapping an existing region is refused
        throw fail.exist(`DMA region [0x${iova.toString(16)}, +0x${size.toString(16)}) overlaps one at 0x${r.iova.toString(16)}`);
      }
    }
  }

  add(region: DmaRegion): void {
    this.checkAdd(region.iova, region.size);
    let i = 0;
    while (i < this.list.length && this.list[i]!.iova < region.iova) i++;
    this.list.splice(i, 0, region);
  }

  /** Removes the region with exactly this iova and size; ENOENT otherwise. */
  remove(iova: bigint, size: bigint): DmaRegion {
    const i = this.list.findIndex((r) => r.iova === iova && r.size === size);
    if (i < 0) throw fail.noent(`no DMA region at 0x${iova.toString(16)} of size 0x${size.toString(16)}`);
    const [region] = this.list.splice(i, 1);
    region!.memory?.unmap();
    return region!;
  }

  removeAll(): DmaRegion[] {
    const all = this.list.splice(0, this.list.length);
    for (const r of all) r.memory?.unmap();
    return all;
  }

  /**
   * The region holding all of [address, address + length); EFAULT when the
   * range is unmapped or straddles regions.
   */
  lookup(address: bigint, length: bigint): DmaRegion {
    const end = address + length;
    // binary search: last region with iova <= address
    let lo = 0;
    let hi = this.list.length - 1;
    let found = -1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      if (this.list[mid]!.iova <= address) {
        found = mid;
        lo = mid + 1;
      } else {
        hi = mid - 1;
      }
    }
    const r = found >= 0 ? this.list[found]! : undefined;
    if (!r || end > r.iova + r.size || length < 0n) {
      throw fail.fault(`DMA range [0x${address.toString(16)}, +0x${length.toString(16)}) is not mapped`);
    }
    return r;
  }
}

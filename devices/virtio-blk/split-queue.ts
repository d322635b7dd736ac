/**
 * One split virtqueue (spec: 2.7) as the device side sees it: the driver's
 * descriptor table and available ring, the device's used ring, all in guest
 * memory and reached only through the device's DMA.
 *
 * - `pop()` takes every chain the driver made available since the last call:
 *   it reads the available index, then the ring entries, then the
 *   descriptor table (once per batch), and walks each chain (direct and
 *   indirect descriptors) into device-readable and device-writable segments.
 * - `complete()` queues a used element; `flush()` writes the queued elements
 *   (one or two DMA writes), then the used index, and says whether the
 *   driver wants an interrupt (VIRTIO_F_EVENT_IDX's used_event, or the
 *   available ring's NO_INTERRUPT flag).
 *
 * A driver that breaks the ring's rules (an index jump larger than the
 * ring, a descriptor index out of range, a loop, nested indirect tables...)
 * gets a RingError: the device then sets DEVICE_NEEDS_RESET (spec: 2.1.2).
 */
import type { Dma, DmaSegment } from "../../src/index.ts";
import { Desc, USED_ELEM_SIZEOF, VRING_AVAIL_F_NO_INTERRUPT, vringNeedEvent } from "./virtio-spec.ts";

/** The driver broke a rule of the ring; the queue cannot go on. */
export class RingError extends Error {}

/** A descriptor chain: its head index and its buffers, device-readable ones first. */
export interface Chain {
  readonly head: number;
  readonly readable: DmaSegment[];
  readonly writable: DmaSegment[];
}

/**
 * Adds a buffer to a segment list, merged into the last one when it follows
 * it in guest memory (a guest's pages are often contiguous): fewer pieces to
 * map and fewer iovecs for the file.
 */
function append(list: DmaSegment[], address: bigint, length: number): void {
  const last = list[list.length - 1];
  if (last !== undefined && last.address + BigInt(last.length) === address && last.length + length <= 0xffff_ffff) {
    list[list.length - 1] = { address: last.address, length: last.length + length };
  } else {
    list.push({ address, length });
  }
}

/** Most entries an indirect table may have (Linux uses seg_max + 2; the spec sets no bound). */
export const MAX_INDIRECT_ENTRIES = 4096;

/** A queue's guest-visible configuration (common cfg fields of the selected queue). */
export interface QueueConfig {
  size: number;
  enabled: boolean;
  desc: bigint;
  driver: bigint;
  device: bigint;
  vector: number;
}

export interface RingPosition {
  /** Next available ring index to take. */
  lastAvail: number;
  /** Used index the device has written (the driver sees it after flush). */
  usedIdx: number;
  /** Used index at the last interrupt decision (VIRTIO_F_EVENT_IDX's old_idx). */
  signalledUsed: number;
}

export class SplitQueue implements QueueConfig, RingPosition {
  size: number;
  enabled = false;
  desc = 0n;
  driver = 0n;
  device = 0n;
  vector: number;
  lastAvail = 0;
  usedIdx = 0;
  signalledUsed = 0;
  /** Used elements completed since the last flush: [head, len] pairs. */
  private pending: number[] = [];

  constructor(
    readonly index: number,
    readonly maxSize: number,
    /** The device's DMA (bound when the device is attached). */
    private readonly dmaOf: () => Dma,
    private readonly noVector: number,
  ) {
    this.size = maxSize;
    this.vector = noVector;
  }

  /** Back to the reset values (spec: 4.1.4.3: queue_size reads the maximum again). */
  reset(): void {
    this.size = this.maxSize;
    this.enabled = false;
    this.desc = 0n;
    this.driver = 0n;
    this.device = 0n;
    this.vector = this.noVector;
    this.lastAvail = 0;
    this.usedIdx = 0;
    this.signalledUsed = 0;
    this.pending = [];
  }

  /** Completed elements not flushed yet. */
  get unflushed(): number {
    return this.pending.length / 2;
  }

  /** The completed, unflushed elements as [head, len, head, len, ...] (for migration). */
  get pendingElements(): number[] {
    return this.pending.slice();
  }

  set pendingElements(v: number[]) {
    this.pending = v.slice();
  }

  private get dma(): Dma {
    return this.dmaOf();
  }

  /**
   * Every chain made available since the last call. With `eventIdx` the
   * device's avail_event is then set to the new position (the driver
   * notifies again only past it); the caller calls pop() again until it is
   * empty, so a chain added meanwhile is not missed.
   */
  async pop(indirect: boolean, eventIdx: boolean): Promise<Chain[]> {
    const size = this.size;
    const availIdx = (await this.dma.read(this.driver + 2n, 2)).readUInt16LE(0);
    const n = (availIdx - this.lastAvail) & 0xffff;
    if (n > size) throw new RingError(`available index ${availIdx} is ${n} entries past ${this.lastAvail}, more than the ${size} of the ring`);
    // (avail_event already says lastAvail: the last pop that took chains wrote it)
    if (n === 0) return [];
    const start = this.lastAvail % size;
    const first = Math.min(n, size - start);
    const heads = await this.dma.readv([
      { address: this.driver + 4n + BigInt(2 * start), length: 2 * first },
      { address: this.driver + 4n, length: 2 * (n - first) },
    ]);
    const table = await this.dma.read(this.desc, size * Desc.SIZEOF);
    const chains: Chain[] = [];
    for (let k = 0; k < n; k++) chains.push(await this.walk(heads.readUInt16LE(2 * k), table, indirect));
    // taken only once nothing can fail: a refused DMA (the device stopping) leaves them available
    const next = (this.lastAvail + n) & 0xffff;
    if (eventIdx) await this.writeAvailEvent(next);
    this.lastAvail = next;
    return chains;
  }

  /**
   * Queues a used element for `head`: `len` bytes were written into its
   * device-writable buffers. One flush at a time per queue (the caller's rule).
   */
  complete(head: number, len: number): void {
    this.pending.push(head, len);
  }

  /**
   * Writes the queued used elements, then the used index (in that order:
   * the driver reads the index first), and whether to interrupt the driver.
   */
  async flush(eventIdx: boolean): Promise<boolean> {
    const pending = this.pending;
    if (pending.length === 0) return false;
    const size = this.size;
    const count = pending.length / 2;
    const elems = Buffer.allocUnsafe(count * USED_ELEM_SIZEOF);
    for (let i = 0; i < count; i++) {
      elems.writeUInt32LE(pending[2 * i]!, i * USED_ELEM_SIZEOF);
      elems.writeUInt32LE(pending[2 * i + 1]!, i * USED_ELEM_SIZEOF + 4);
    }
    const start = this.usedIdx % size;
    const first = Math.min(count, size - start);
    await this.dma.writev(
      [
        { address: this.device + 4n + BigInt(start * USED_ELEM_SIZEOF), length: first * USED_ELEM_SIZEOF },
        { address: this.device + 4n, length: (count - first) * USED_ELEM_SIZEOF },
      ],
      elems,
    );
    const newIdx = (this.usedIdx + count) & 0xffff;
    const idx = Buffer.allocUnsafe(2);
    idx.writeUInt16LE(newIdx, 0);
    await this.dma.write(this.device + 2n, idx);
    // only now are they the driver's: a refused write (the device stopped) leaves them queued
    this.pending = this.pending.slice(pending.length);
    this.usedIdx = newIdx;
    const old = this.signalledUsed;
    this.signalledUsed = newIdx;
    if (eventIdx) {
      // spec: 2.7.10: used_event sits after the available ring's entries
      const usedEvent = (await this.dma.read(this.driver + 4n + BigInt(2 * size), 2)).readUInt16LE(0);
      return vringNeedEvent(usedEvent, newIdx, old);
    }
    const flags = (await this.dma.read(this.driver, 2)).readUInt16LE(0);
    return (flags & VRING_AVAIL_F_NO_INTERRUPT) === 0;
  }

  /** A chain again from its head (a request recorded in flight by a migration source). */
  async chainAt(head: number, indirect: boolean): Promise<Chain> {
    const table = await this.dma.read(this.desc, this.size * Desc.SIZEOF);
    return this.walk(head, table, indirect);
  }

  /** spec: 2.7.10: avail_event sits after the used ring's elements. */
  private async writeAvailEvent(value: number): Promise<void> {
    const b = Buffer.allocUnsafe(2);
    b.writeUInt16LE(value, 0);
    await this.dma.write(this.device + 4n + BigInt(USED_ELEM_SIZEOF * this.size), b);
  }

  private async walk(head: number, direct: Buffer, indirectAllowed: boolean): Promise<Chain> {
    const size = this.size;
    if (head >= size) throw new RingError(`chain head ${head} is outside the ${size}-entry descriptor table`);
    const readable: DmaSegment[] = [];
    const writable: DmaSegment[] = [];
    let table = direct;
    let entries = size;
    let inIndirect = false;
    let i = head;
    // spec: 2.7.5.3.1: a chain is no longer than the queue (or its indirect table)
    for (let seen = 0; ; ) {
      if (++seen > entries) throw new RingError(`descriptor chain from ${head} loops or is longer than ${entries}`);
      const at = i * Desc.SIZEOF;
      const address = table.readBigUInt64LE(at);
      const length = table.readUInt32LE(at + 8);
      const flags = table.readUInt16LE(at + 12);
      const next = table.readUInt16LE(at + 14);
      if (flags & Desc.F_INDIRECT) {
        if (!indirectAllowed) throw new RingError("indirect descriptor without VIRTIO_F_INDIRECT_DESC");
        if (inIndirect) throw new RingError("indirect descriptor inside an indirect table");
        // spec: 2.7.5.3.1: the driver MUST NOT set both INDIRECT and NEXT
        if (flags & Desc.F_NEXT) throw new RingError("descriptor with both INDIRECT and NEXT");
        if (length === 0 || length % Desc.SIZEOF !== 0 || length / Desc.SIZEOF > MAX_INDIRECT_ENTRIES) {
          throw new RingError(`indirect table of ${length} bytes (a non-zero multiple of 16, at most ${MAX_INDIRECT_ENTRIES} entries)`);
        }
        table = await this.dma.read(address, length);
        entries = length / Desc.SIZEOF;
        inIndirect = true;
        i = 0;
        seen = 0;
        continue;
      }
      if (flags & Desc.F_WRITE) append(writable, address, length);
      else if (writable.length > 0) throw new RingError(`chain from ${head}: a device-readable buffer after a device-writable one`);
      else append(readable, address, length);
      if (!(flags & Desc.F_NEXT)) break;
      if (next >= entries) throw new RingError(`chain from ${head}: next index ${next} is outside the ${entries}-entry table`);
      i = next;
    }
    return { head, readable, writable };
  }
}

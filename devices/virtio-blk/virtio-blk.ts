/**
 * virtio-blk: a virtio 1.x modern (non-transitional) PCI block device
 * (vendor 0x1af4, device 0x1042, revision 1) that Linux's own virtio_pci +
 * virtio_blk drivers use, backed by a raw image file.
 *
 * - Transport (virtio-pci.ts): structures in BAR0 announced by vendor
 *   capabilities, MSI-X in BAR1 (one vector for configuration changes and
 *   one per queue) with INTx and the ISR as the fallback.
 * - Queues (split-queue.ts): split virtqueues with chained and indirect
 *   descriptors and VIRTIO_F_EVENT_IDX, all through the device's DMA.
 * - Requests (spec: 5.2.6): IN, OUT, FLUSH and GET_ID; any other type is
 *   answered VIRTIO_BLK_S_UNSUPP. Data moves between the image and guest
 *   memory without a copy when the client shared its memory (zero-copy DMA
 *   views given to readv/writev on the thread pool), through DMA_READ /
 *   DMA_WRITE copies when it did not. The event loop never waits for the
 *   disk.
 * - Completions are batched: the used ring and its index are written once
 *   per turn of the event loop, with one interrupt if the driver wants one.
 * - Migration: quiesce() stops taking requests, waits for those in flight to
 *   complete (status written, used ring published, interrupt sent) and
 *   flushes the image; the state carries the negotiated features, status,
 *   queue configuration and ring positions (and any request still in flight,
 *   which the destination runs again from its descriptors). Both ends use the
 *   same image.
 *
 * Options: file=PATH (raw image; created with size= if absent), size=BYTES
 * (K/M/G suffixes; without file= a scratch disk of that size, default 16M,
 * that vanishes with the process), readonly=on, queues=N (VIRTIO_BLK_F_MQ
 * when above 1), queue-size=N (power of two, default 256), serial=STRING
 * (GET_ID, up to 20 bytes), event-idx=off, indirect=off.
 */
import type { BarDefinition, CapabilitiesDefinition, Device, DeviceContext, DeviceFactory, DeviceOptions, DmaSegment, StateValue } from "../../src/index.ts";
import { defineOptions, OptionError, parseOptions, readState } from "../../src/index.ts";
import { BlockFile } from "./block-file.ts";
import { RingError, type Chain } from "./split-queue.ts";
import { MSIX_BAR, MSIX_PBA_OFFSET, MSIX_TABLE_OFFSET, VirtioPciTransport } from "./virtio-pci.ts";
import {
  BLK_OUTHDR_SIZEOF,
  BlkConfig,
  BlkFeature,
  BlkStatus,
  BlkType,
  Feature,
  SECTOR_SIZE,
  VIRTIO_BLK_ID_BYTES,
  VIRTIO_ID_BLOCK,
  VIRTIO_PCI_MODERN_DEVICE_BASE,
  VIRTIO_PCI_VENDOR_ID,
} from "./virtio-spec.ts";

/** Largest request moved through a bounce buffer (memory the client did not share); larger ones fail with IOERR. */
export const MAX_COPY_REQUEST = 64 << 20;

export interface VirtioBlkOptions {
  file?: string;
  size?: bigint;
  readonly: boolean;
  queues: number;
  queueSize: number;
  serial: string;
  eventIdx: boolean;
  indirect: boolean;
}

/** `--opt` keys (the shared schema: unknown keys, types and ranges are checked the same way as every device's). */
export const VIRTIO_BLK_OPTIONS = defineOptions({
  file: { type: "string", description: "raw image; created with size= when absent" },
  size: { type: "size", min: 512n, max: BigInt(Number.MAX_SAFE_INTEGER), description: "a multiple of 512; without file=, a scratch disk (default 16M)" },
  readonly: { type: "boolean", default: false, description: "refuse writes (VIRTIO_BLK_F_RO)" },
  queues: { type: "integer", min: 1, max: 16, default: 1, description: "request queues" },
  "queue-size": { type: "integer", min: 2, max: 32768, default: 256, description: "entries per queue, a power of two" },
  serial: { type: "string", default: "vfio-user-ts", description: `GET_ID string, at most ${VIRTIO_BLK_ID_BYTES} printable ASCII characters` },
  "event-idx": { type: "boolean", default: true, description: "offer VIRTIO_RING_F_EVENT_IDX" },
  indirect: { type: "boolean", default: true, description: "offer VIRTIO_RING_F_INDIRECT_DESC" },
});

/** A byte count like 512, 64K, 256M, 2G: a positive multiple of 512. */
export function parseDiskSize(text: string): bigint {
  return parseVirtioBlkOptions({ size: text }).size!;
}

export function parseVirtioBlkOptions(o: DeviceOptions): VirtioBlkOptions {
  const v = parseOptions("virtio-blk", VIRTIO_BLK_OPTIONS, o);
  const queueSize = v["queue-size"];
  if ((queueSize & (queueSize - 1)) !== 0) throw new OptionError(`virtio-blk: queue-size=${queueSize}: not a power of two`);
  if (v.size !== undefined && v.size % BigInt(SECTOR_SIZE) !== 0n) throw new OptionError(`virtio-blk: size=${o.size}: not a multiple of 512 bytes`);
  const serial = v.serial;
  if (Buffer.byteLength(serial) > VIRTIO_BLK_ID_BYTES || !/^[\x20-\x7e]*$/.test(serial)) {
    throw new OptionError(`virtio-blk: serial=${serial}: at most ${VIRTIO_BLK_ID_BYTES} printable ASCII characters`);
  }
  return {
    file: v.file,
    size: v.size,
    readonly: v.readonly,
    queues: v.queues,
    queueSize,
    serial,
    eventIdx: v["event-idx"],
    indirect: v.indirect,
  };
}

/** What a request came to: its status, and the bytes written into its writable buffers before the status byte. */
interface Outcome {
  status: number;
  written: number;
}

/** The device stopped under the request: run it again when it runs (or on the migration destination). */
const STOPPED = "stopped" as const;

/** Counters for tests and benchmarks. */
export interface VirtioBlkStats {
  requests: number;
  reads: number;
  writes: number;
  flushes: number;
  bytesRead: number;
  bytesWritten: number;
  /** Requests whose data moved through zero-copy views. */
  zeroCopy: number;
  /** Requests whose data moved through a bounce buffer (DMA messages). */
  copied: number;
  errors: number;
  interrupts: number;
  /** Guest buffers of the data of IN and OUT requests, after merging adjacent ones. */
  segments: number;
}

function total(segs: readonly DmaSegment[]): number {
  let n = 0;
  for (const s of segs) n += s.length;
  return n;
}

/** Splits segments after `n` bytes: [the first n bytes, the rest]. */
function splitAt(segs: readonly DmaSegment[], n: number): [DmaSegment[], DmaSegment[]] {
  const head: DmaSegment[] = [];
  const tail: DmaSegment[] = [];
  let left = n;
  for (const s of segs) {
    if (left >= s.length) {
      if (s.length > 0) head.push(s);
      left -= s.length;
    } else if (left > 0) {
      head.push({ address: s.address, length: left });
      tail.push({ address: s.address + BigInt(left), length: s.length - left });
      left = 0;
    } else {
      tail.push(s);
    }
  }
  return [head, tail];
}

export class VirtioBlkDevice implements Device {
  readonly type = "virtio-blk";
  readonly stateVersion = 1;
  readonly identity = {
    vendorId: VIRTIO_PCI_VENDOR_ID,
    deviceId: VIRTIO_PCI_MODERN_DEVICE_BASE + VIRTIO_ID_BLOCK,
    subsystemVendorId: VIRTIO_PCI_VENDOR_ID,
    // spec: 4.1.2.1: non-transitional devices SHOULD have a subsystem ID of 0x40 or higher
    subsystemId: 0x1100,
    // mass storage, SCSI (as QEMU's virtio-blk-pci)
    classCode: 0x010000,
    // spec: 4.1.2.1: non-transitional devices SHOULD have revision 1 or higher
    revision: 1,
  };
  readonly interruptPin = 1;
  readonly capabilities: CapabilitiesDefinition;
  readonly bars: readonly BarDefinition[];
  readonly options: VirtioBlkOptions;
  readonly stats: VirtioBlkStats = { requests: 0, reads: 0, writes: 0, flushes: 0, bytesRead: 0, bytesWritten: 0, zeroCopy: 0, copied: 0, errors: 0, interrupts: 0, segments: 0 };

  private readonly transport: VirtioPciTransport;
  private readonly file: BlockFile;
  /** Capacity in 512-byte sectors. */
  readonly capacity: bigint;
  private readonly config: Buffer;
  private ctx!: DeviceContext;

  /** Bumped by every reset: work of an older generation no longer touches the guest. */
  private generation = 0;
  /** Requests of this generation in flight, by queue << 16 | head. */
  private inflight = new Set<number>();
  /** Requests to run again (the device stopped under them, or a migration source had them in flight). */
  private retry: { queue: number; head: number }[] = [];
  /** Requests of any generation still executing (their I/O may touch guest memory). */
  private outstanding = 0;
  private quiescing = false;
  private readonly pumping: boolean[];
  private readonly pumpAgain: boolean[];
  private readonly flushScheduled: boolean[];
  private readonly flushChain: Promise<void>[];
  private flushesRunning = 0;
  private waiters: { ready: () => boolean; resolve: () => void }[] = [];
  private warnings = 0;

  constructor(options: DeviceOptions = {}) {
    const o = parseVirtioBlkOptions(options);
    this.options = o;
    let features = (1n << BigInt(BlkFeature.SEG_MAX)) | (1n << BigInt(BlkFeature.BLK_SIZE)) | (1n << BigInt(BlkFeature.FLUSH));
    if (o.readonly) features |= 1n << BigInt(BlkFeature.RO);
    if (o.queues > 1) features |= 1n << BigInt(BlkFeature.MQ);
    if (o.indirect) features |= 1n << BigInt(Feature.RING_INDIRECT_DESC);
    if (o.eventIdx) features |= 1n << BigInt(Feature.RING_EVENT_IDX);
    this.transport = new VirtioPciTransport({ numQueues: o.queues, queueSize: o.queueSize, features, configSize: BlkConfig.SIZEOF });
    this.file = BlockFile.open({ path: o.file, size: o.size, readonly: o.readonly });
    this.capacity = this.file.size / BigInt(SECTOR_SIZE);
    if (this.capacity === 0n) throw new Error(`virtio-blk: ${this.file.label} is smaller than one 512-byte sector`);
    this.config = this.buildConfig();
    this.capabilities = {
      msix: { vectors: this.transport.vectors, tableBar: MSIX_BAR, tableOffset: MSIX_TABLE_OFFSET, pbaBar: MSIX_BAR, pbaOffset: MSIX_PBA_OFFSET },
      vendor: this.transport.capabilities(),
    };
    this.bars = this.transport.bars();
    const n = o.queues;
    this.pumping = new Array<boolean>(n).fill(false);
    this.pumpAgain = new Array<boolean>(n).fill(false);
    this.flushScheduled = new Array<boolean>(n).fill(false);
    this.flushChain = Array.from({ length: n }, () => Promise.resolve());
  }

  attach(ctx: DeviceContext): void {
    this.ctx = ctx;
    this.transport.attach(ctx, {
      readConfig: (offset, data) => void this.config.copy(data, 0, offset, offset + data.length),
      // no writable fields: VIRTIO_BLK_F_CONFIG_WCE is not offered
      writeConfig: () => {},
      queueNotified: (q) => this.pump(q),
      drainForReset: () => this.drainForReset(),
    });
  }

  /** DEVICE_RESET: power-on; work in flight is dropped (it no longer writes rings or interrupts). */
  reset(): void {
    this.dropWork();
    this.quiescing = false;
    this.transport.reset();
  }

  async quiesce(): Promise<void> {
    this.quiescing = true;
    await this.until(() => this.idle());
    await this.file.flush();
  }

  runStateChanged(running: boolean): void {
    if (!running) return;
    this.quiescing = false;
    this.transport.restoreLine();
    const again = this.retry;
    this.retry = [];
    const gen = this.generation;
    for (const r of again) void this.resubmit(r.queue, r.head, gen);
    this.transport.queues.forEach((q, i) => {
      if (q.unflushed > 0) this.scheduleFlush(i);
      if (this.transport.live && q.enabled) this.pump(i);
    });
  }

  saveState(): StateValue {
    const inflight: number[] = [];
    for (const key of this.inflight) inflight.push(key >>> 16, key & 0xffff);
    for (const r of this.retry) inflight.push(r.queue, r.head);
    return {
      disk: { capacity: this.capacity, readonly: this.options.readonly, features: this.transport.features, queueSize: this.options.queueSize },
      transport: this.transport.saveState(),
      inflight,
    };
  }

  loadState(state: StateValue): void {
    const s = readState("virtio-blk", state);
    const disk = s.object("disk");
    const capacity = disk.u64("capacity");
    const ro = disk.bool("readonly");
    const features = disk.u64("features");
    const queueSize = disk.int("queueSize", 1, 32768);
    disk.end();
    if (capacity !== this.capacity) throw new Error(`virtio-blk: the source's disk has ${capacity} sectors, this one ${this.capacity} (both ends need the same image)`);
    if (ro !== this.options.readonly || features !== this.transport.features || queueSize !== this.options.queueSize) {
      throw new Error("virtio-blk: the source was configured differently (readonly, queues, queue-size, event-idx or indirect)");
    }
    const transport = s.value("transport");
    const list = s.value("inflight");
    s.end();
    if (!Array.isArray(list) || list.length % 2 !== 0) throw new Error("virtio-blk: inflight is not a list of [queue, head] pairs");
    const retry: { queue: number; head: number }[] = [];
    for (let i = 0; i < list.length; i += 2) {
      const queue = list[i] as unknown;
      const head = list[i + 1] as unknown;
      if (typeof queue !== "number" || typeof head !== "number" || !Number.isInteger(queue) || !Number.isInteger(head) || queue < 0 || queue >= this.options.queues || head < 0 || head >= queueSize) {
        throw new Error(`virtio-blk: inflight entry ${i / 2} is not a queue and head of this device`);
      }
      retry.push({ queue, head });
    }
    this.dropWork();
    this.transport.loadState(transport);
    this.retry = retry;
  }

  async dispose(): Promise<void> {
    this.dropWork();
    await this.until(() => this.outstanding === 0);
    await this.file.close();
  }

  // ---- device configuration (spec: 5.2.4) ----

  private buildConfig(): Buffer {
    const c = Buffer.alloc(BlkConfig.SIZEOF);
    c.writeBigUInt64LE(this.capacity, BlkConfig.CAPACITY);
    // spec: 5.2.4: seg_max; a chain also holds the header and the status
    c.writeUInt32LE(this.options.queueSize - 2, BlkConfig.SEG_MAX);
    c.writeUInt32LE(SECTOR_SIZE, BlkConfig.BLK_SIZE);
    c.writeUInt16LE(this.options.queues, BlkConfig.NUM_QUEUES);
    return c;
  }

  // ---- queue processing ----

  private mayTake(q: number): boolean {
    return this.ctx.running && !this.quiescing && this.transport.live && this.transport.queues[q]!.enabled;
  }

  /** Takes every available request of queue `q` and starts it; one pump per queue at a time. */
  private pump(q: number): void {
    if (this.pumping[q]) {
      this.pumpAgain[q] = true;
      return;
    }
    this.pumping[q] = true;
    void this.drainAvail(q).finally(() => {
      this.pumping[q] = false;
      this.wake();
    });
  }

  private async drainAvail(q: number): Promise<void> {
    const queue = this.transport.queues[q]!;
    const gen = this.generation;
    const indirect = this.transport.has(Feature.RING_INDIRECT_DESC);
    const eventIdx = this.transport.has(Feature.RING_EVENT_IDX);
    try {
      do {
        this.pumpAgain[q] = false;
        while (gen === this.generation && this.mayTake(q)) {
          const chains = await queue.pop(indirect, eventIdx);
          if (gen !== this.generation || chains.length === 0) break;
          for (const c of chains) this.start(q, c, gen);
        }
      } while (this.pumpAgain[q] && gen === this.generation && this.mayTake(q));
    } catch (err) {
      this.queueFailed(q, err, gen);
    }
  }

  private async resubmit(q: number, head: number, gen: number): Promise<void> {
    try {
      const chain = await this.transport.queues[q]!.chainAt(head, this.transport.has(Feature.RING_INDIRECT_DESC));
      if (gen === this.generation) this.start(q, chain, gen);
    } catch (err) {
      if (!this.ctx.running) this.retry.push({ queue: q, head });
      else this.queueFailed(q, err, gen);
    }
  }

  /** A ring the driver broke, or ring memory the device cannot reach: DEVICE_NEEDS_RESET. */
  private queueFailed(q: number, err: unknown, gen: number): void {
    // a stop or a reset while the ring was read: the next run takes it from where it was
    if (gen !== this.generation || !this.ctx.running) return;
    // info, not warn: a guest can provoke it at will, and so does a client that left (its memory went with it)
    this.note("info", { queue: q, err: (err as Error).message, ring: err instanceof RingError }, "virtio-blk: queue failed; device needs a reset");
    this.transport.needsReset();
  }

  private start(q: number, chain: Chain, gen: number): void {
    const key = (q << 16) | chain.head;
    if (this.inflight.has(key)) {
      this.queueFailed(q, new RingError(`descriptor ${chain.head} made available again while its request is in flight`), gen);
      return;
    }
    this.inflight.add(key);
    this.outstanding++;
    this.stats.requests++;
    void this.run(q, chain, gen).finally(() => {
      this.outstanding--;
      this.wake();
    });
  }

  /** Executes a request, writes its status byte and queues its used element. */
  private async run(q: number, chain: Chain, gen: number): Promise<void> {
    const key = (q << 16) | chain.head;
    const writableBytes = total(chain.writable);
    // spec: 5.2.6: the status byte is the last device-writable byte
    const [data, status] = writableBytes > 0 ? splitAt(chain.writable, writableBytes - 1) : [[], []];
    let outcome: Outcome | typeof STOPPED;
    if (status.length === 0) {
      this.warn({ queue: q, head: chain.head }, "virtio-blk: request without a status byte");
      outcome = { status: -1, written: 0 };
    } else {
      outcome = await this.execute(chain.readable, data);
    }
    if (gen !== this.generation) return; // reset meanwhile: dropped
    if (outcome !== STOPPED && outcome.status >= 0) {
      try {
        await this.ctx.dma.write(status[0]!.address, Uint8Array.of(outcome.status));
      } catch (err) {
        outcome = this.ctx.running ? { status: -1, written: 0 } : STOPPED;
        if (outcome !== STOPPED) this.warn({ queue: q, head: chain.head, err: (err as Error).message }, "virtio-blk: status byte not writable");
      }
    }
    if (gen !== this.generation) return;
    this.inflight.delete(key);
    if (outcome === STOPPED) {
      this.retry.push({ queue: q, head: chain.head });
      return;
    }
    if (outcome.status !== BlkStatus.OK) this.stats.errors++;
    this.transport.queues[q]!.complete(chain.head, outcome.status >= 0 ? outcome.written + 1 : 0);
    this.scheduleFlush(q);
  }

  private async execute(readable: readonly DmaSegment[], data: DmaSegment[]): Promise<Outcome | typeof STOPPED> {
    const readableBytes = total(readable);
    if (readableBytes < BLK_OUTHDR_SIZEOF) return { status: BlkStatus.IOERR, written: 0 };
    const [hdrSegs, payload] = splitAt(readable, BLK_OUTHDR_SIZEOF);
    let hdr: Buffer;
    try {
      hdr = await this.ctx.dma.readv(hdrSegs);
    } catch (err) {
      return this.dmaFailed(err);
    }
    const type = hdr.readUInt32LE(0);
    const sector = hdr.readBigUInt64LE(8);
    switch (type) {
      case BlkType.IN:
        return this.transfer("in", sector, data);
      case BlkType.OUT:
        return this.transfer("out", sector, payload);
      case BlkType.FLUSH:
        this.stats.flushes++;
        try {
          await this.file.flush();
        } catch (err) {
          return this.ioFailed("flush", err);
        }
        return { status: BlkStatus.OK, written: 0 };
      case BlkType.GET_ID: {
        const n = Math.min(VIRTIO_BLK_ID_BYTES, total(data));
        const id = Buffer.alloc(VIRTIO_BLK_ID_BYTES);
        id.write(this.options.serial, "ascii");
        try {
          await this.ctx.dma.writev(splitAt(data, n)[0], id.subarray(0, n));
        } catch (err) {
          return this.dmaFailed(err);
        }
        return { status: BlkStatus.OK, written: n };
      }
      default:
        // spec: 5.2.6.1: other types (DISCARD, WRITE_ZEROES, ... not offered) are unsupported
        return { status: BlkStatus.UNSUPP, written: 0 };
    }
  }

  /** The byte offset of a transfer of `len` bytes at `sector`, or null when it does not fit the disk. */
  private position(sector: bigint, len: number): number | null {
    if (len % SECTOR_SIZE !== 0) return null;
    if (sector > this.capacity || BigInt(len / SECTOR_SIZE) > this.capacity - sector) return null;
    return Number(sector) * SECTOR_SIZE;
  }

  /**
   * IN (disk to guest) or OUT (guest to disk) of `segs` at `sector`: through
   * zero-copy views of guest memory when the client shared it, else through
   * a bounce buffer and DMA messages.
   */
  private async transfer(dir: "in" | "out", sector: bigint, segs: DmaSegment[]): Promise<Outcome | typeof STOPPED> {
    // spec: 5.2.6.2: a write to a read-only device fails
    if (dir === "out" && this.options.readonly) return { status: BlkStatus.IOERR, written: 0 };
    const len = total(segs);
    const pos = this.position(sector, len);
    if (pos === null) return { status: BlkStatus.IOERR, written: 0 };
    if (dir === "in") this.stats.reads++;
    else this.stats.writes++;
    this.stats.segments += segs.length;
    const op = dir === "in" ? "read" : "write";
    let views;
    try {
      // the device writes guest memory for IN, reads it for OUT
      views = this.ctx.dma.map(segs, dir === "in" ? "write" : "read");
    } catch (err) {
      return this.dmaFailed(err);
    }
    if (views) {
      this.stats.zeroCopy++;
      try {
        await (dir === "in" ? this.file.read(views.buffers, pos) : this.file.write(views.buffers, pos));
      } catch (err) {
        return this.ioFailed(op, err);
      } finally {
        views.release();
      }
    } else {
      if (len > MAX_COPY_REQUEST) return { status: BlkStatus.IOERR, written: 0 };
      this.stats.copied++;
      let buf: Buffer;
      try {
        buf = dir === "out" ? await this.ctx.dma.readv(segs) : Buffer.allocUnsafe(len);
      } catch (err) {
        return this.dmaFailed(err);
      }
      try {
        await (dir === "in" ? this.file.read([buf], pos) : this.file.write([buf], pos));
      } catch (err) {
        return this.ioFailed(op, err);
      }
      try {
        if (dir === "in") await this.ctx.dma.writev(segs, buf);
      } catch (err) {
        return this.dmaFailed(err);
      }
    }
    if (dir === "in") this.stats.bytesRead += len;
    else this.stats.bytesWritten += len;
    return { status: BlkStatus.OK, written: dir === "in" ? len : 0 };
  }

  /** Guest memory refused: the device stopped (run it again later), or a bad buffer (IOERR). */
  private dmaFailed(err: unknown): Outcome | typeof STOPPED {
    if (!this.ctx.running) return STOPPED;
    this.warn({ err: (err as Error).message }, "virtio-blk: request buffer not reachable");
    return { status: BlkStatus.IOERR, written: 0 };
  }

  private ioFailed(op: string, err: unknown): Outcome {
    this.warn({ op, file: this.file.label, err: (err as Error).message }, "virtio-blk: image I/O failed");
    return { status: BlkStatus.IOERR, written: 0 };
  }

  // ---- completions ----

  /** The used ring is written once per turn of the event loop, for every request completed in it. */
  private scheduleFlush(q: number): void {
    if (this.flushScheduled[q]) return;
    this.flushScheduled[q] = true;
    this.flushesRunning++;
    setImmediate(() => {
      this.flushScheduled[q] = false;
      this.flushChain[q] = this.flushChain[q]!.then(() => this.flushQueue(q)).finally(() => {
        this.flushesRunning--;
        this.wake();
      });
    });
  }

  private async flushQueue(q: number): Promise<void> {
    const queue = this.transport.queues[q]!;
    // stopped: the elements stay queued (and go with the state) until the device runs
    if (queue.unflushed === 0 || !this.ctx.running) return;
    const gen = this.generation;
    try {
      const interrupt = await queue.flush(this.transport.has(Feature.RING_EVENT_IDX));
      if (interrupt && gen === this.generation && this.ctx.running) {
        this.stats.interrupts++;
        this.transport.interruptQueue(q);
      }
    } catch (err) {
      this.queueFailed(q, err, gen);
    }
  }

  // ---- waiting for work to end ----

  /** Nothing in flight, nothing being taken, every completion published. */
  private idle(): boolean {
    return (
      this.outstanding === 0 &&
      this.flushesRunning === 0 &&
      !this.pumping.some(Boolean) &&
      this.transport.queues.every((q) => q.unflushed === 0 || !this.ctx.running)
    );
  }

  private until(ready: () => boolean): Promise<void> {
    if (ready()) return Promise.resolve();
    return new Promise((resolve) => this.waiters.push({ ready, resolve }));
  }

  private wake(): void {
    if (this.waiters.length === 0) return;
    const ready = this.waiters.filter((w) => w.ready());
    this.waiters = this.waiters.filter((w) => !ready.includes(w));
    for (const w of ready) w.resolve();
  }

  /** device_status 0: drop the work in flight, and wait until its I/O no longer touches guest memory. */
  private drainForReset(): Promise<void> {
    this.dropWork();
    return this.until(() => this.outstanding === 0 && this.flushesRunning === 0 && !this.pumping.some(Boolean));
  }

  /** Work in flight no longer counts: its completions are not written (nor are completions not yet published). */
  private dropWork(): void {
    this.generation++;
    this.inflight = new Set();
    this.retry = [];
    for (const q of this.transport.queues) q.pendingElements = [];
  }

  private warn(fields: Record<string, unknown>, msg: string): void {
    this.note("warn", fields, msg);
  }

  /** Log lines a guest can provoke: the first few, then one in a hundred. */
  private note(level: "info" | "warn", fields: Record<string, unknown>, msg: string): void {
    const n = ++this.warnings;
    if (n <= 10 || n % 100 === 0) this.ctx.log[level]({ ...fields, count: n }, msg);
  }
}

export const virtioBlkFactory: DeviceFactory = {
  name: "virtio-blk",
  description:
    "virtio 1.x block device for Linux's virtio_blk",
  options: VIRTIO_BLK_OPTIONS,
  create: (options) => new VirtioBlkDevice(options),
};

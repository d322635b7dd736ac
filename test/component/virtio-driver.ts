/**
 * A small virtio-pci driver for tests, written from the virtio 1.2 spec
 * (and as Linux's virtio_pci_modern does it): it finds the vendor
 * capabilities, resets the device, negotiates features, sets up split
 * queues in guest RAM, and submits virtio-blk requests with chained or
 * indirect descriptors, all through a VfioUserClient acting as the VMM.
 *
 * Guest RAM is a list of DMA regions at adjacent IOVAs, each either a memfd
 * shared with the server or a buffer served by the client (DMA_READ /
 * DMA_WRITE), so tests can put a request's buffers across region edges.
 */
import { closeFd, createEventfd, type VfioUserClient } from "../../src/client/client.ts";
import { GuestMemory } from "../../src/client/guest-memory.ts";
import { IrqIndex } from "../../protocol/constants.ts";
import { PciCapId, PciMsix } from "../../src/pci/registers.ts";
import { walkCapabilities } from "../../src/pci/capabilities.ts";
import { CommonCfg, Desc, PciCap, PciCapType, Status } from "../../devices/virtio-blk/virtio-spec.ts";

const CONFIG = 7;

/** One DMA region of guest RAM. */
interface RamPart {
  iova: bigint;
  size: bigint;
  mem: GuestMemory | null;
  buffer: Buffer | null;
}

/** Guest RAM over one or more adjacent regions. */
export class GuestRam {
  private readonly parts: RamPart[] = [];

  constructor(
    readonly base: bigint,
    /** Region sizes and kinds, laid out from `base` one after the other. */
    layout: readonly { size: bigint; fd: boolean }[],
  ) {
    let at = base;
    for (const l of layout) {
      this.parts.push({ iova: at, size: l.size, mem: l.fd ? GuestMemory.create(l.size, { iova: at, name: "virtio-test" }) : null, buffer: l.fd ? null : Buffer.alloc(Number(l.size)) });
      at += l.size;
    }
  }

  get end(): bigint {
    const last = this.parts[this.parts.length - 1]!;
    return last.iova + last.size;
  }

  /** The regions at which RAM splits (for tests that straddle them). */
  get edges(): bigint[] {
    return this.parts.slice(1).map((p) => p.iova);
  }

  async mapInto(client: VfioUserClient): Promise<void> {
    for (const p of this.parts) {
      if (p.mem) await p.mem.mapInto(client);
      else await client.dmaMap({ iova: p.iova, size: p.size, buffer: p.buffer! });
    }
  }

  read(addr: bigint, n: number): Buffer {
    const out = Buffer.alloc(n);
    this.walk(addr, n, (p, off, at, len) => {
      const src = p.mem ? p.mem.read(off, len) : p.buffer!.subarray(Number(off), Number(off) + len);
      src.copy(out, at);
    });
    return out;
  }

  write(addr: bigint, data: Uint8Array): void {
    this.walk(addr, data.length, (p, off, at, len) => {
      const part = data.subarray(at, at + len);
      if (p.mem) p.mem.write(off, part);
      else p.buffer!.set(part, Number(off));
    });
  }

  u16(addr: bigint): number {
    return this.read(addr, 2).readUInt16LE(0);
  }

  setU16(addr: bigint, v: number): void {
    const b = Buffer.alloc(2);
    b.writeUInt16LE(v & 0xffff, 0);
    this.write(addr, b);
  }

  close(): void {
    for (const p of this.parts) p.mem?.close();
  }

  private walk(addr: bigint, n: number, fn: (p: RamPart, off: bigint, at: number, len: number) => void): void {
    let at = 0;
    while (at < n) {
      const a = addr + BigInt(at);
      const p = this.parts.find((x) => a >= x.iova && a < x.iova + x.size);
      if (!p) throw new RangeError(`guest RAM has no byte at 0x${a.toString(16)}`);
      const len = Math.min(n - at, Number(p.iova + p.size - a));
      fn(p, a - p.iova, at, len);
      at += len;
    }
  }
}

export interface VirtioCaps {
  common: number;
  notify: number;
  notifyLength: number;
  notifyMultiplier: number;
  isr: number;
  device: number;
  deviceLength: number;
  pciCfg: number;
  /** Config-space offsets of every vendor capability. */
  all: number[];
}

export interface QueueLayout {
  size: number;
  desc: bigint;
  avail: bigint;
  used: bigint;
}

/** One buffer of a request: device-readable data, or `length` device-writable bytes. */
export type Buf = { out: Uint8Array } | { in: number };

export interface Submitted {
  head: number;
  /** Guest addresses of the device-writable buffers, in order. */
  inAddrs: { addr: bigint; length: number }[];
}

export class VirtioTestDriver {
  caps!: VirtioCaps;
  deviceFeatures = 0n;
  readonly queues: QueueLayout[] = [];
  private readonly availIdx: number[] = [];
  private readonly freeHeads: number[][] = [];
  private readonly seenUsed: number[] = [];
  /** Bump allocator for request buffers. */
  private next: bigint;
  private readonly fds: number[] = [];

  constructor(
    readonly client: VfioUserClient,
    readonly ram: GuestRam,
    /** Where queue rings go (64 KiB per queue), and where buffers start. */
    private readonly rings: bigint,
    buffers: bigint,
  ) {
    this.next = buffers;
  }

  async probe(): Promise<VirtioCaps> {
    const cfg = await this.client.regionRead(CONFIG, 0, 256);
    const list = walkCapabilities((o) => cfg[o]!).filter((c) => c.id === PciCapId.VNDR);
    const caps: Partial<VirtioCaps> = { all: list.map((c) => c.offset) };
    for (const { offset } of list) {
      const type = cfg[offset + PciCap.CFG_TYPE]!;
      const off = cfg.readUInt32LE(offset + PciCap.OFFSET);
      const len = cfg.readUInt32LE(offset + PciCap.LENGTH);
      if (cfg[offset + PciCap.BAR] !== 0 && type !== PciCapType.PCI_CFG) throw new Error(`virtio structure in BAR ${cfg[offset + PciCap.BAR]}`);
      if (type === PciCapType.COMMON_CFG) caps.common ??= off;
      if (type === PciCapType.ISR_CFG) caps.isr ??= off;
      if (type === PciCapType.DEVICE_CFG) {
        caps.device ??= off;
        caps.deviceLength ??= len;
      }
      if (type === PciCapType.NOTIFY_CFG && caps.notify === undefined) {
        caps.notify = off;
        caps.notifyLength = len;
        caps.notifyMultiplier = cfg.readUInt32LE(offset + PciCap.NOTIFY_OFF_MULTIPLIER);
      }
      if (type === PciCapType.PCI_CFG) caps.pciCfg ??= offset;
    }
    this.caps = caps as VirtioCaps;
    return this.caps;
  }

  // ---- register access (BAR0) ----

  async common(off: number, width: 1 | 2 | 4 | 8): Promise<bigint> {
    const b = await this.client.regionRead(0, this.caps.common + off, width);
    return width === 8 ? b.readBigUInt64LE(0) : BigInt(b.readUIntLE(0, width));
  }

  async setCommon(off: number, width: 1 | 2 | 4 | 8, v: bigint | number): Promise<void> {
    const b = Buffer.alloc(width);
    if (width === 8) b.writeBigUInt64LE(BigInt(v), 0);
    else b.writeUIntLE(Number(v), 0, width);
    await this.client.regionWrite(0, this.caps.common + off, b);
  }

  async status(): Promise<number> {
    return Number(await this.common(CommonCfg.DEVICE_STATUS, 1));
  }

  async deviceConfig(off: number, width: 1 | 2 | 4 | 8): Promise<bigint> {
    const b = await this.client.regionRead(0, this.caps.device + off, width);
    return width === 8 ? b.readBigUInt64LE(0) : BigInt(b.readUIntLE(0, width));
  }

  async readIsr(): Promise<number> {
    return (await this.client.regionRead(0, this.caps.isr, 1))[0]!;
  }

  /** Writes 0 to device_status and waits (bounded) for it to read 0 (spec: 2.4). */
  async reset(): Promise<void> {
    await this.setCommon(CommonCfg.DEVICE_STATUS, 1, 0);
    for (let i = 0; i < 1000; i++) {
      if ((await this.status()) === 0) return;
      await new Promise((r) => setTimeout(r, 2));
    }
    throw new Error("device_status never read 0 after a reset");
  }

  async features(): Promise<bigint> {
    await this.setCommon(CommonCfg.DEVICE_FEATURE_SELECT, 4, 0);
    const lo = await this.common(CommonCfg.DEVICE_FEATURE, 4);
    await this.setCommon(CommonCfg.DEVICE_FEATURE_SELECT, 4, 1);
    const hi = await this.common(CommonCfg.DEVICE_FEATURE, 4);
    return (hi << 32n) | lo;
  }

  /** Writes the driver features and sets FEATURES_OK; returns whether the device kept it. */
  async negotiate(accept: bigint): Promise<boolean> {
    await this.setCommon(CommonCfg.DRIVER_FEATURE_SELECT, 4, 0);
    await this.setCommon(CommonCfg.DRIVER_FEATURE, 4, accept & 0xffff_ffffn);
    await this.setCommon(CommonCfg.DRIVER_FEATURE_SELECT, 4, 1);
    await this.setCommon(CommonCfg.DRIVER_FEATURE, 4, accept >> 32n);
    const s = await this.status();
    await this.setCommon(CommonCfg.DEVICE_STATUS, 1, s | Status.FEATURES_OK);
    return ((await this.status()) & Status.FEATURES_OK) !== 0;
  }

  /**
   * The whole bring-up: reset, ACKNOWLEDGE | DRIVER, features (`accept`
   * masked by what the device offers), queues, then DRIVER_OK. Queue
   * vectors: `vectors[q]` (and config vector `configVector`) when given.
   */
  async init(o: { accept: bigint; queues?: number; queueSize?: number; configVector?: number; vectors?: number[] }): Promise<void> {
    await this.probe();
    await this.reset();
    await this.setCommon(CommonCfg.DEVICE_STATUS, 1, Status.ACKNOWLEDGE);
    await this.setCommon(CommonCfg.DEVICE_STATUS, 1, Status.ACKNOWLEDGE | Status.DRIVER);
    this.deviceFeatures = await this.features();
    if (!(await this.negotiate(o.accept & this.deviceFeatures))) throw new Error("device refused the features");
    if (o.configVector !== undefined) await this.setCommon(CommonCfg.CONFIG_MSIX_VECTOR, 2, o.configVector);
    const n = o.queues ?? 1;
    for (let q = 0; q < n; q++) await this.setupQueue(q, o.queueSize, o.vectors?.[q]);
    const s = await this.status();
    await this.setCommon(CommonCfg.DEVICE_STATUS, 1, s | Status.DRIVER_OK);
  }

  async setupQueue(q: number, size?: number, vector?: number): Promise<QueueLayout> {
    await this.setCommon(CommonCfg.QUEUE_SELECT, 2, q);
    const max = Number(await this.common(CommonCfg.QUEUE_SIZE, 2));
    const n = size ?? max;
    if (n !== max) await this.setCommon(CommonCfg.QUEUE_SIZE, 2, n);
    const base = this.rings + BigInt(q) * 0x10000n;
    const layout = { size: n, desc: base, avail: base + BigInt(16 * n), used: base + 0x8000n };
    this.ram.write(base, Buffer.alloc(0x10000));
    await this.setCommon(CommonCfg.QUEUE_DESC, 8, layout.desc);
    await this.setCommon(CommonCfg.QUEUE_DRIVER, 8, layout.avail);
    await this.setCommon(CommonCfg.QUEUE_DEVICE, 8, layout.used);
    if (vector !== undefined) await this.setCommon(CommonCfg.QUEUE_MSIX_VECTOR, 2, vector);
    await this.setCommon(CommonCfg.QUEUE_ENABLE, 2, 1);
    this.queues[q] = layout;
    this.availIdx[q] = 0;
    this.seenUsed[q] = 0;
    this.freeHeads[q] = Array.from({ length: n }, (_, i) => i);
    return layout;
  }

  /** MSI-X on with `count` eventfds (vector i -> fds[i]); returns the fds. */
  async enableMsix(count: number): Promise<number[]> {
    const cfg = await this.client.regionRead(CONFIG, 0, 256);
    const cap = walkCapabilities((o) => cfg[o]!).find((c) => c.id === PciCapId.MSIX)!;
    const f = Buffer.alloc(2);
    f.writeUInt16LE(PciMsix.FLAGS_ENABLE, 0);
    await this.client.regionWrite(CONFIG, cap.offset + PciMsix.FLAGS, f);
    const fds = Array.from({ length: count }, () => createEventfd());
    this.fds.push(...fds);
    await this.client.setIrqEventfds(IrqIndex.MSIX, 0, fds);
    return fds;
  }

  /** INTx through an eventfd; returns it. */
  async enableIntx(): Promise<number> {
    const fd = createEventfd();
    this.fds.push(fd);
    await this.client.setIrqEventfds(IrqIndex.INTX, 0, [fd]);
    return fd;
  }

  /** Guest memory for a request buffer (16-byte aligned), optionally placed to end `straddle` bytes before an address. */
  alloc(n: number, align = 16): bigint {
    this.next = (this.next + BigInt(align - 1)) & ~BigInt(align - 1);
    const at = this.next;
    this.next += BigInt(Math.max(n, 1));
    return at;
  }

  /** Moves the allocator to `at`. */
  allocAt(at: bigint): void {
    this.next = at;
  }

  /**
   * Puts a chain of `bufs` in queue `q` (direct descriptors, or one indirect
   * table) and makes it available; does not notify.
   */
  add(q: number, bufs: readonly Buf[], o: { indirect?: boolean; placeAt?: bigint[] } = {}): Submitted {
    const layout = this.queues[q]!;
    const descs: { addr: bigint; len: number; flags: number }[] = [];
    const inAddrs: { addr: bigint; length: number }[] = [];
    bufs.forEach((b, i) => {
      if ("out" in b) {
        const addr = o.placeAt?.[i] ?? this.alloc(b.out.length);
        this.ram.write(addr, b.out);
        descs.push({ addr, len: b.out.length, flags: 0 });
      } else {
        const addr = o.placeAt?.[i] ?? this.alloc(b.in);
        this.ram.write(addr, Buffer.alloc(b.in, 0xcc));
        descs.push({ addr, len: b.in, flags: Desc.F_WRITE });
        inAddrs.push({ addr, length: b.in });
      }
    });
    const free = this.freeHeads[q]!;
    const writeDesc = (table: bigint, i: number, d: { addr: bigint; len: number; flags: number }, next: number) => {
      const e = Buffer.alloc(16);
      e.writeBigUInt64LE(d.addr, 0);
      e.writeUInt32LE(d.len, 8);
      e.writeUInt16LE(d.flags, 12);
      e.writeUInt16LE(next, 14);
      this.ram.write(table + BigInt(16 * i), e);
    };
    let head: number;
    if (o.indirect) {
      const table = this.alloc(16 * descs.length);
      descs.forEach((d, i) => writeDesc(table, i, { ...d, flags: d.flags | (i < descs.length - 1 ? Desc.F_NEXT : 0) }, i + 1));
      head = free.shift()!;
      writeDesc(layout.desc, head, { addr: table, len: 16 * descs.length, flags: Desc.F_INDIRECT }, 0);
    } else {
      if (free.length < descs.length) throw new Error("queue full");
      const ids = free.splice(0, descs.length);
      head = ids[0]!;
      descs.forEach((d, i) => writeDesc(layout.desc, ids[i]!, { ...d, flags: d.flags | (i < descs.length - 1 ? Desc.F_NEXT : 0) }, ids[i + 1] ?? 0));
    }
    const idx = this.availIdx[q]!;
    this.ram.setU16(layout.avail + 4n + BigInt(2 * (idx % layout.size)), head);
    this.availIdx[q] = (idx + 1) & 0xffff;
    this.ram.setU16(layout.avail + 2n, this.availIdx[q]!);
    return { head, inAddrs };
  }

  /** Notifies queue `q` through its notify address (`posted`: no reply awaited, as QEMU posts MMIO writes). */
  async kick(q: number, o: { posted?: boolean } = {}): Promise<void> {
    const b = Buffer.alloc(2);
    b.writeUInt16LE(q, 0);
    await this.client.regionWrite(0, this.caps.notify + this.caps.notifyMultiplier * q, b, { posted: o.posted });
  }

  usedIdx(q: number): number {
    return this.ram.u16(this.queues[q]!.used + 2n);
  }

  /** Waits (bounded) for `n` more used elements; returns them and frees their heads (descriptors not tracked per chain: tests reset between uses). */
  async waitUsed(q: number, n: number, timeoutMs = 5000): Promise<{ id: number; len: number }[]> {
    const deadline = Date.now() + timeoutMs;
    const layout = this.queues[q]!;
    while (((this.usedIdx(q) - this.seenUsed[q]!) & 0xffff) < n) {
      if (Date.now() > deadline) throw new Error(`queue ${q}: ${(this.usedIdx(q) - this.seenUsed[q]!) & 0xffff} of ${n} used elements after ${timeoutMs} ms`);
      await new Promise((r) => setTimeout(r, 1));
    }
    const out: { id: number; len: number }[] = [];
    for (let k = 0; k < n; k++) {
      const i = (this.seenUsed[q]! + k) % layout.size;
      const e = this.ram.read(layout.used + 4n + BigInt(8 * i), 8);
      out.push({ id: e.readUInt32LE(0), len: e.readUInt32LE(4) });
    }
    this.seenUsed[q] = (this.seenUsed[q]! + n) & 0xffff;
    return out;
  }

  /** Frees every descriptor of queue `q` again (for a driver that has nothing in flight). */
  recycle(q: number): void {
    this.freeHeads[q] = Array.from({ length: this.queues[q]!.size }, (_, i) => i);
  }

  /** used_event (the driver's interrupt threshold, VIRTIO_F_EVENT_IDX). */
  setUsedEvent(q: number, v: number): void {
    const l = this.queues[q]!;
    this.ram.setU16(l.avail + 4n + BigInt(2 * l.size), v);
  }

  /** avail_event, as the device wrote it. */
  availEvent(q: number): number {
    const l = this.queues[q]!;
    return this.ram.u16(l.used + 4n + BigInt(8 * l.size));
  }

  close(): void {
    for (const fd of this.fds.splice(0)) closeFd(fd);
  }
}

/** A virtio-blk request header. */
export function blkHeader(type: number, sector: bigint): Buffer {
  const h = Buffer.alloc(16);
  h.writeUInt32LE(type, 0);
  h.writeBigUInt64LE(sector, 8);
  return h;
}

/**
 * The virtio-pci modern transport (spec: 4.1, "Virtio Over PCI Bus") for a
 * device written against the public device API: the structures in BAR0,
 * each announced by a vendor-specific capability, the MSI-X table in BAR1,
 * the status handshake and feature negotiation, queue configuration, and
 * interrupt delivery (MSI-X vectors, or INTx with the ISR). The device
 * model (virtio-blk.ts) supplies the device configuration space and does the
 * work when a queue is notified.
 *
 * BAR0 (32-bit memory, 16 KiB), one 4 KiB page per structure as QEMU lays
 * them out:
 *   0x0000 common configuration (virtio_pci_common_cfg, 0x40 bytes)
 *   0x1000 ISR status (1 byte; a read returns and clears it)
 *   0x2000 device configuration
 *   0x3000 notifications: queue n at 0x3000 + 4 n (notify_off_multiplier 4),
 *          each a doorbell a client may serve as an ioeventfd
 * BAR1 (32-bit memory, 4 KiB): MSI-X table at 0, PBA at 0x800; vector 0 is
 * meant for configuration changes and 1..n for the queues (the driver
 * chooses: config_msix_vector, queue_msix_vector).
 *
 * Registers are byte arrays: an access of any width at any offset reads or
 * merges the bytes of the fields it covers (the spec asks drivers for
 * natural widths, and Linux writes 64-bit fields as two 32-bit halves).
 */
import type { BarDefinition, DeviceContext, Doorbell, StateValue, VendorCapability } from "../../src/index.ts";
import { readState } from "../../src/index.ts";
import { SplitQueue } from "./split-queue.ts";
import { CommonCfg, Feature, Isr, PciCap, PciCapType, Status, VIRTIO_MSI_NO_VECTOR, hasFeature } from "./virtio-spec.ts";

export const BAR0_SIZE = 0x4000n;
export const COMMON_OFFSET = 0x0000;
export const ISR_OFFSET = 0x1000;
export const DEVICE_CFG_OFFSET = 0x2000;
export const NOTIFY_OFFSET = 0x3000;
export const NOTIFY_OFF_MULTIPLIER = 4;
const AREA = 0x1000;
export const MSIX_BAR = 1;
export const MSIX_TABLE_OFFSET = 0;
export const MSIX_PBA_OFFSET = 0x800;

/** What the device model gives the transport. */
export interface VirtioModel {
  /** Device configuration reads (offset within it; `data` is zero-filled). */
  readConfig(offset: number, data: Buffer): void;
  /** Device configuration writes. */
  writeConfig(offset: number, data: Buffer): void;
  /** Queue `index` was notified, or may have work (DRIVER_OK, enable). */
  queueNotified(index: number): void;
  /**
   * The driver wrote 0 to device_status: resolve once nothing the device
   * started can still touch guest memory. The transport presents 0 (and
   * resets its queues) only then (spec: 2.4, the driver waits for 0).
   */
  drainForReset(): Promise<void>;
}

export interface VirtioPciOptions {
  numQueues: number;
  /** Maximum queue size (a power of two). */
  queueSize: number;
  /** Features the device offers (VIRTIO_F_VERSION_1 is added). */
  features: bigint;
  /** Size of the device configuration structure (at most 4 KiB). */
  configSize: number;
}

/** The fields of the common configuration, in order: offset and width. */
const FIELDS: readonly (readonly [number, number])[] = [
  [CommonCfg.DEVICE_FEATURE_SELECT, 4],
  [CommonCfg.DEVICE_FEATURE, 4],
  [CommonCfg.DRIVER_FEATURE_SELECT, 4],
  [CommonCfg.DRIVER_FEATURE, 4],
  [CommonCfg.CONFIG_MSIX_VECTOR, 2],
  [CommonCfg.NUM_QUEUES, 2],
  [CommonCfg.DEVICE_STATUS, 1],
  [CommonCfg.CONFIG_GENERATION, 1],
  [CommonCfg.QUEUE_SELECT, 2],
  [CommonCfg.QUEUE_SIZE, 2],
  [CommonCfg.QUEUE_MSIX_VECTOR, 2],
  [CommonCfg.QUEUE_ENABLE, 2],
  [CommonCfg.QUEUE_NOTIFY_OFF, 2],
  [CommonCfg.QUEUE_DESC, 8],
  [CommonCfg.QUEUE_DRIVER, 8],
  [CommonCfg.QUEUE_DEVICE, 8],
  [CommonCfg.QUEUE_NOTIF_CONFIG_DATA, 2],
  [CommonCfg.QUEUE_RESET, 2],
  [CommonCfg.ADMIN_QUEUE_INDEX, 2],
  [CommonCfg.ADMIN_QUEUE_NUM, 2],
];

interface TransportRegs {
  status: number;
  deviceFeatureSelect: number;
  driverFeatureSelect: number;
  driverFeatures: bigint;
  configVector: number;
  queueSelect: number;
  isr: number;
}

const powerOn = (): TransportRegs => ({
  status: 0,
  deviceFeatureSelect: 0,
  driverFeatureSelect: 0,
  driverFeatures: 0n,
  configVector: VIRTIO_MSI_NO_VECTOR,
  queueSelect: 0,
  isr: 0,
});

const isPowerOfTwo = (n: number) => n > 0 && (n & (n - 1)) === 0;

export class VirtioPciTransport {
  readonly queues: SplitQueue[];
  readonly features: bigint;
  /** MSI-X vectors: one for configuration changes plus one per queue. */
  readonly vectors: number;
  private r: TransportRegs = powerOn();
  private ctx!: DeviceContext;
  private model!: VirtioModel;
  /** device_status was written 0 and the reset waits for in-flight work. */
  private resetting = false;

  constructor(private readonly o: VirtioPciOptions) {
    if (!Number.isInteger(o.numQueues) || o.numQueues < 1 || o.numQueues > 64) throw new RangeError(`virtio: ${o.numQueues} queues; 1 to 64`);
    if (!isPowerOfTwo(o.queueSize) || o.queueSize > 32768) throw new RangeError(`virtio: queue size ${o.queueSize} is not a power of two up to 32768`);
    this.features = o.features | (1n << BigInt(Feature.VERSION_1));
    this.vectors = o.numQueues + 1;
    if (o.configSize > AREA) throw new RangeError(`virtio: device configuration of ${o.configSize} bytes`);
    const dma = () => this.ctx.dma;
    this.queues = Array.from({ length: o.numQueues }, (_, i) => new SplitQueue(i, o.queueSize, dma, VIRTIO_MSI_NO_VECTOR));
  }

  /** Binds the device's context (the queues DMA through ctx.dma) and model. */
  attach(ctx: DeviceContext, model: VirtioModel): void {
    this.ctx = ctx;
    this.model = model;
  }

  // ---- what the device definition needs ----

  /** The vendor capabilities announcing the structures, and the PCI configuration access window. */
  capabilities(): VendorCapability[] {
    const cap = (type: number, bar: number, offset: number, length: number, extra = 0): Uint8Array => {
      const b = Buffer.alloc(PciCap.SIZEOF + extra);
      b[PciCap.CAP_VNDR] = 0x09;
      b[PciCap.CAP_LEN] = b.length;
      b[PciCap.CFG_TYPE] = type;
      b[PciCap.BAR] = bar;
      b.writeUInt32LE(offset, PciCap.OFFSET);
      b.writeUInt32LE(length, PciCap.LENGTH);
      return b;
    };
    const notify = cap(PciCapType.NOTIFY_CFG, 0, NOTIFY_OFFSET, NOTIFY_OFF_MULTIPLIER * this.o.numQueues, 4);
    Buffer.from(notify.buffer).writeUInt32LE(NOTIFY_OFF_MULTIPLIER, PciCap.NOTIFY_OFF_MULTIPLIER);
    // spec: 4.1.4.9: bar, offset, length and pci_cfg_data are the driver's to write
    const window = cap(PciCapType.PCI_CFG, 0, 0, 0, 4);
    const writable = new Uint8Array(window.length);
    writable[PciCap.BAR] = 0xff;
    writable.fill(0xff, PciCap.OFFSET, PciCap.PCI_CFG_SIZEOF);
    return [
      { bytes: cap(PciCapType.COMMON_CFG, 0, COMMON_OFFSET, CommonCfg.SIZEOF) },
      { bytes: notify },
      { bytes: cap(PciCapType.ISR_CFG, 0, ISR_OFFSET, 1) },
      { bytes: cap(PciCapType.DEVICE_CFG, 0, DEVICE_CFG_OFFSET, this.o.configSize) },
      { bytes: window, writable, read: (o, d, c) => this.windowRead(o, d, c), write: (o, n, c) => this.windowWrite(o, n, c) },
    ];
  }

  /** BAR0 (the structures) and BAR1 (MSI-X, served by the framework). */
  bars(): BarDefinition[] {
    const doorbells: Doorbell[] = this.queuesOrCount().map((i) => ({ offset: NOTIFY_OFFSET + NOTIFY_OFF_MULTIPLIER * i, size: 2, ring: () => this.notify(i) }));
    return [
      { index: 0, size: BAR0_SIZE, kind: "mem32", read: (o, d) => this.barRead(o, d), write: (o, d) => this.barWrite(o, d), doorbells },
      { index: MSIX_BAR, size: 0x1000n, kind: "mem32", read: (_o, d) => void d.fill(0), write: () => {} },
    ];
  }

  // ---- state the device model reads ----

  get status(): number {
    return this.r.status;
  }

  /** The features the driver accepted (valid once FEATURES_OK is set). */
  get negotiated(): bigint {
    return this.r.driverFeatures;
  }

  has(bit: number): boolean {
    return hasFeature(this.r.driverFeatures, bit);
  }

  /** The driver set DRIVER_OK and the device does not need a reset: queues may be processed. */
  get live(): boolean {
    const s = this.r.status;
    return (s & Status.DRIVER_OK) !== 0 && (s & Status.FEATURES_OK) !== 0 && (s & Status.DEVICE_NEEDS_RESET) === 0 && !this.resetting;
  }

  // ---- interrupts ----

  /** The driver is told queue `index` used buffers (spec: 4.1.5.2). */
  interruptQueue(index: number): void {
    this.raise(Isr.QUEUE, this.queues[index]!.vector);
  }

  /** The device configuration (or status) changed (spec: 4.1.5.3). */
  interruptConfig(): void {
    this.raise(Isr.CONFIG, this.r.configVector);
  }

  /**
   * Something went wrong the driver must recover from with a reset (spec:
   * 2.1.2: DEVICE_NEEDS_RESET, then a configuration change notification).
   */
  needsReset(): void {
    if (this.r.status & Status.DEVICE_NEEDS_RESET) return;
    this.r.status |= Status.DEVICE_NEEDS_RESET;
    if (this.r.status & Status.DRIVER_OK) this.interruptConfig();
  }

  /** After migration or a stop: the INTx line as the ISR says (the level is device state). */
  restoreLine(): void {
    if (this.r.isr !== 0 && this.ctx.irq.mode === "intx") this.ctx.irq.setLevel(true);
  }

  // ---- reset, migration ----

  /** Power-on: registers, queues, ISR (device reset and status 0). */
  reset(): void {
    const line = this.r.isr !== 0;
    this.r = powerOn();
    this.resetting = false;
    for (const q of this.queues) q.reset();
    // the ISR is clear now: so is the line it drove
    if (line && this.ctx) this.ctx.irq.setLevel(false);
  }

  /**
   * The transport's state. A reset the driver asked for that still waits
   * for in-flight work is saved as done (the device drops that work).
   */
  saveState(): StateValue {
    if (this.resetting) {
      const t = new VirtioPciTransport(this.o);
      return t.saveState();
    }
    const r = this.r;
    return {
      status: r.status,
      deviceFeatureSelect: r.deviceFeatureSelect,
      driverFeatureSelect: r.driverFeatureSelect,
      driverFeatures: r.driverFeatures,
      configVector: r.configVector,
      queueSelect: r.queueSelect,
      isr: r.isr,
      queues: this.queues.map((q) => ({
        size: q.size,
        enabled: q.enabled,
        desc: q.desc,
        driver: q.driver,
        device: q.device,
        vector: q.vector,
        lastAvail: q.lastAvail,
        usedIdx: q.usedIdx,
        signalledUsed: q.signalledUsed,
        completed: q.pendingElements,
      })),
    };
  }

  loadState(state: StateValue): void {
    const s = readState("virtio-pci", state);
    const regs: TransportRegs = {
      status: s.int("status", 0, 0xff),
      deviceFeatureSelect: s.u32("deviceFeatureSelect"),
      driverFeatureSelect: s.u32("driverFeatureSelect"),
      driverFeatures: s.u64("driverFeatures"),
      configVector: s.int("configVector", 0, 0xffff),
      queueSelect: s.int("queueSelect", 0, 0xffff),
      isr: s.int("isr", 0, Isr.QUEUE | Isr.CONFIG),
    };
    if ((regs.status & Status.FEATURES_OK) && !this.featuresOk(regs.driverFeatures)) throw new Error("virtio-pci: state has FEATURES_OK with features this device does not offer");
    const qs = s.value("queues");
    if (!Array.isArray(qs) || qs.length !== this.queues.length) throw new Error(`virtio-pci: state has ${Array.isArray(qs) ? qs.length : "no"} queues, this device has ${this.queues.length}`);
    const loaded = qs.map((v, i) => {
      const q = readState(`virtio-pci: queue ${i}`, v);
      const size = q.int("size", 1, this.o.queueSize);
      if (!isPowerOfTwo(size)) throw new Error(`virtio-pci: queue ${i} size ${size} is not a power of two`);
      const out = {
        size,
        enabled: q.bool("enabled"),
        desc: q.u64("desc"),
        driver: q.u64("driver"),
        device: q.u64("device"),
        vector: q.int("vector", 0, 0xffff),
        lastAvail: q.int("lastAvail", 0, 0xffff),
        usedIdx: q.int("usedIdx", 0, 0xffff),
        signalledUsed: q.int("signalledUsed", 0, 0xffff),
        completed: q.value("completed"),
      };
      if (!Array.isArray(out.completed) || out.completed.length % 2 !== 0 || out.completed.some((x) => !Number.isInteger(x) || x < 0 || x > 0xffff_ffff)) {
        throw new Error(`virtio-pci: queue ${i} completed elements are not [head, len] pairs`);
      }
      q.end();
      return out;
    });
    s.end();
    this.r = regs;
    this.resetting = false;
    loaded.forEach((l, i) => {
      const q = this.queues[i]!;
      Object.assign(q, { size: l.size, enabled: l.enabled, desc: l.desc, driver: l.driver, device: l.device, vector: l.vector });
      q.lastAvail = l.lastAvail;
      q.usedIdx = l.usedIdx;
      q.signalledUsed = l.signalledUsed;
      q.pendingElements = l.completed as number[];
    });
  }

  // ---- BAR0 ----

  private barRead(offset: number, data: Buffer): void {
    data.fill(0);
    const area = offset & ~(AREA - 1);
    const at = offset - area;
    if (at + data.length > AREA) return;
    switch (area) {
      case COMMON_OFFSET:
        if (at < CommonCfg.SIZEOF) this.commonImage().copy(data, 0, at, Math.min(CommonCfg.SIZEOF, at + data.length));
        return;
      case ISR_OFFSET:
        if (at === 0) {
          // spec: 4.1.4.5: reading the ISR resets it, and deasserts INTx
          data[0] = this.r.isr;
          this.r.isr = 0;
          this.ctx.irq.setLevel(false);
        }
        return;
      case DEVICE_CFG_OFFSET: {
        const n = Math.min(data.length, this.o.configSize - at);
        if (n > 0) this.model.readConfig(at, data.subarray(0, n));
        return;
      }
      default:
        return; // notifications read as zero
    }
  }

  private barWrite(offset: number, data: Buffer): void {
    const area = offset & ~(AREA - 1);
    const at = offset - area;
    if (at + data.length > AREA) return;
    switch (area) {
      case COMMON_OFFSET:
        if (at + data.length <= CommonCfg.SIZEOF) this.commonWrite(at, data);
        return;
      case DEVICE_CFG_OFFSET:
        if (at + data.length <= this.o.configSize) this.model.writeConfig(at, data);
        return;
      case NOTIFY_OFFSET: {
        // the address says which queue (notify_off_multiplier 4); the value is its index
        const q = Math.floor(at / NOTIFY_OFF_MULTIPLIER);
        if (q < this.queues.length) this.notify(q);
        return;
      }
      default:
        return;
    }
  }

  private notify(index: number): void {
    if (this.live && this.queues[index]?.enabled) this.model.queueNotified(index);
  }

  private queuesOrCount(): number[] {
    return Array.from({ length: this.o.numQueues }, (_, i) => i);
  }

  /** The common configuration as the driver reads it now. */
  private commonImage(): Buffer {
    const r = this.r;
    const b = Buffer.alloc(CommonCfg.SIZEOF);
    const sel = r.deviceFeatureSelect;
    b.writeUInt32LE(sel < 2 ? Number((this.features >> BigInt(32 * sel)) & 0xffff_ffffn) : 0, CommonCfg.DEVICE_FEATURE);
    b.writeUInt32LE(r.deviceFeatureSelect, CommonCfg.DEVICE_FEATURE_SELECT);
    b.writeUInt32LE(r.driverFeatureSelect, CommonCfg.DRIVER_FEATURE_SELECT);
    const dsel = r.driverFeatureSelect;
    b.writeUInt32LE(dsel < 2 ? Number((r.driverFeatures >> BigInt(32 * dsel)) & 0xffff_ffffn) : 0, CommonCfg.DRIVER_FEATURE);
    b.writeUInt16LE(r.configVector, CommonCfg.CONFIG_MSIX_VECTOR);
    b.writeUInt16LE(this.queues.length, CommonCfg.NUM_QUEUES);
    // spec: 2.4.1: status reads 0 only once the reset is done
    b[CommonCfg.DEVICE_STATUS] = r.status;
    b[CommonCfg.CONFIG_GENERATION] = 0;
    b.writeUInt16LE(r.queueSelect, CommonCfg.QUEUE_SELECT);
    const q = this.queues[r.queueSelect];
    if (q) {
      // spec: 4.1.4.3.2: a queue that is not available reads size 0
      b.writeUInt16LE(q.size, CommonCfg.QUEUE_SIZE);
      b.writeUInt16LE(q.vector, CommonCfg.QUEUE_MSIX_VECTOR);
      b.writeUInt16LE(q.enabled ? 1 : 0, CommonCfg.QUEUE_ENABLE);
      b.writeUInt16LE(q.index, CommonCfg.QUEUE_NOTIFY_OFF);
      b.writeBigUInt64LE(q.desc, CommonCfg.QUEUE_DESC);
      b.writeBigUInt64LE(q.driver, CommonCfg.QUEUE_DRIVER);
      b.writeBigUInt64LE(q.device, CommonCfg.QUEUE_DEVICE);
    } else {
      b.writeUInt16LE(VIRTIO_MSI_NO_VECTOR, CommonCfg.QUEUE_MSIX_VECTOR);
    }
    return b;
  }

  /** A write of any width: every field it touches gets its merged new value, in offset order. */
  private commonWrite(at: number, data: Buffer): void {
    const image = this.commonImage();
    data.copy(image, at);
    const end = at + data.length;
    for (const [off, width] of FIELDS) {
      if (off + width <= at || off >= end) continue;
      const v = width === 8 ? image.readBigUInt64LE(off) : BigInt(image.readUIntLE(off, width));
      this.setField(off, v);
    }
  }

  private setField(off: number, v: bigint): void {
    const r = this.r;
    const n = Number(v & 0xffff_ffffn);
    const q = this.queues[r.queueSelect];
    switch (off) {
      case CommonCfg.DEVICE_FEATURE_SELECT:
        r.deviceFeatureSelect = n;
        return;
      case CommonCfg.DRIVER_FEATURE_SELECT:
        r.driverFeatureSelect = n;
        return;
      case CommonCfg.DRIVER_FEATURE: {
        // spec: 3.1.1: features are fixed once FEATURES_OK is set
        const sel = r.driverFeatureSelect;
        if (r.status & Status.FEATURES_OK || sel > 1) return;
        const shift = BigInt(32 * sel);
        r.driverFeatures = (r.driverFeatures & ~(0xffff_ffffn << shift)) | (BigInt(n) << shift);
        return;
      }
      case CommonCfg.CONFIG_MSIX_VECTOR:
        // spec: 4.1.5.1.2: a vector the device cannot use reads back NO_VECTOR
        r.configVector = n < this.vectors ? n : VIRTIO_MSI_NO_VECTOR;
        return;
      case CommonCfg.DEVICE_STATUS:
        this.setStatus(n & 0xff);
        return;
      case CommonCfg.QUEUE_SELECT:
        r.queueSelect = n & 0xffff;
        return;
      case CommonCfg.QUEUE_MSIX_VECTOR:
        if (q) q.vector = n < this.vectors ? n : VIRTIO_MSI_NO_VECTOR;
        return;
    }
    // the rest configures the selected queue, and only while it is not enabled
    if (!q || q.enabled) return;
    switch (off) {
      case CommonCfg.QUEUE_SIZE:
        // spec: 2.7: a split queue's size is a power of two, at most the maximum
        if (isPowerOfTwo(n) && n <= q.maxSize) q.size = n;
        return;
      case CommonCfg.QUEUE_ENABLE:
        if (n !== 1) return;
        q.enabled = true;
        this.notify(q.index);
        return;
      case CommonCfg.QUEUE_DESC:
        q.desc = v;
        return;
      case CommonCfg.QUEUE_DRIVER:
        q.driver = v;
        return;
      case CommonCfg.QUEUE_DEVICE:
        q.device = v;
        return;
    }
  }

  private setStatus(v: number): void {
    const r = this.r;
    if (v === 0) {
      this.requestReset();
      return;
    }
    if (this.resetting) return;
    const old = r.status;
    // DEVICE_NEEDS_RESET is the device's
    let s = (v & ~Status.DEVICE_NEEDS_RESET) | (old & Status.DEVICE_NEEDS_RESET);
    // spec: 3.1.1: the device refuses features it did not offer, or a driver without VERSION_1
    if (s & Status.FEATURES_OK && !(old & Status.FEATURES_OK) && !this.featuresOk(r.driverFeatures)) s &= ~Status.FEATURES_OK;
    r.status = s;
    if (s & Status.DRIVER_OK && !(old & Status.DRIVER_OK)) for (const q of this.queues) this.notify(q.index);
  }

  private featuresOk(driver: bigint): boolean {
    return (driver & ~this.features) === 0n && hasFeature(driver, Feature.VERSION_1);
  }

  private requestReset(): void {
    if (this.resetting) return;
    if (this.r.status === 0) {
      this.reset();
      return;
    }
    this.resetting = true;
    this.model.drainForReset().then(
      () => {
        if (this.resetting) this.reset();
      },
      () => {
        if (this.resetting) this.reset();
      },
    );
  }

  private raise(bit: number, vector: number): void {
    const irq = this.ctx.irq;
    this.r.isr |= bit;
    if (irq.mode === "msix") {
      if (vector !== VIRTIO_MSI_NO_VECTOR) irq.notify(vector);
    } else if (irq.mode === "intx") {
      irq.setLevel(true);
    }
  }

  // ---- VIRTIO_PCI_CAP_PCI_CFG: BAR access through config space (spec: 4.1.4.9) ----

  /** The window's target, or null when it does not name a valid access. */
  private window(cap: Buffer): { offset: number; length: number } | null {
    const bar = cap[PciCap.BAR]!;
    const offset = cap.readUInt32LE(PciCap.OFFSET);
    const length = cap.readUInt32LE(PciCap.LENGTH);
    if (bar !== 0 || (length !== 1 && length !== 2 && length !== 4) || offset % length !== 0 || offset + length > Number(BAR0_SIZE)) return null;
    return { offset, length };
  }

  private windowRead(offset: number, data: Buffer, cap: Buffer): void {
    const lo = Math.max(offset, PciCap.PCI_CFG_DATA);
    const hi = Math.min(offset + data.length, PciCap.PCI_CFG_SIZEOF);
    if (lo >= hi) return;
    const w = this.window(cap);
    if (!w) return;
    const value = Buffer.alloc(4);
    this.barRead(w.offset, value.subarray(0, w.length));
    value.copy(data, lo - offset, lo - PciCap.PCI_CFG_DATA, hi - PciCap.PCI_CFG_DATA);
  }

  private windowWrite(offset: number, length: number, cap: Buffer): void {
    if (offset + length <= PciCap.PCI_CFG_DATA || offset >= PciCap.PCI_CFG_SIZEOF) return;
    const w = this.window(cap);
    if (w) this.barWrite(w.offset, cap.subarray(PciCap.PCI_CFG_DATA, PciCap.PCI_CFG_DATA + w.length));
  }
}

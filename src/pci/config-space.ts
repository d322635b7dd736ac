/**
 * PCI configuration space of one type-0 function: the bytes the guest sees,
 * with per-byte masks for guest-writable and write-1-to-clear bits, BAR sizing,
 * and the capability list. Writes are byte-granular, so a 32-bit write at 0x04
 * carrying status bytes keeps the status register's read-only and W1C rules.
 */
import type { DeviceIdentity, VendorCapability } from "../device/api.ts";
import {
  CAPABILITY_LIST_START,
  msiCapability,
  msixCapability,
  pcieCapability,
  placeCapabilities,
  pmCapability,
  vendorCapability,
  type CapabilityImage,
  type CapabilityName,
} from "./capabilities.ts";
import {
  PCIE_CONFIG_SPACE_SIZE,
  PCI_CONFIG_SPACE_SIZE,
  PCI_NUM_BARS,
  PCI_STATUS_ERROR_BITS,
  PciBaseAddress,
  PciCommand,
  PciHeader,
  PciHeaderType,
  PciMsi,
  PciMsix,
  PciPm,
  PciStatus,
  barOffset,
} from "./registers.ts";

export interface BarSpec {
  /** BAR slot, 0..5; a mem64 BAR also takes index + 1. */
  index: number;
  /** Power of two; mem >= 16, io 4..256. */
  size: bigint;
  kind: "mem32" | "mem64" | "io";
  prefetchable?: boolean;
}

/** The device's identity (src/device/api.ts) plus what config space is built from. */
export interface ConfigSpaceSpec extends DeviceIdentity {
  bars: BarSpec[];
  /** 0 none, 1 = INTA .. 4 = INTD. */
  interruptPin?: number;
  capabilities?: {
    pm?: boolean;
    msi?: { vectors: 1 | 2 | 4 | 8 | 16 | 32; perVectorMask?: boolean };
    msix?: { vectors: number; tableBar: number; tableOffset: number; pbaBar: number; pbaOffset: number };
    pcie?: boolean;
    vendor?: readonly VendorCapability[];
  };
}

/** What a guest write changed, for the layers that act on it. */
export interface ConfigWriteEffects {
  commandChanged: boolean;
  /** BAR indices (the BarSpec index; a mem64 BAR once) whose value changed. */
  barsChanged: number[];
  msiChanged: boolean;
  msixChanged: boolean;
}

export interface MsiView {
  readonly capOffset: number;
  /** Vectors the function is capable of (Multiple Message Capable). */
  readonly vectors: number;
  readonly perVectorMask: boolean;
  readonly enabled: boolean;
  readonly address: bigint;
  readonly data: number;
  /** 1 << Multiple Message Enable, whether or not MSI is enabled. */
  readonly enabledVectors: number;
  /** Per-vector mask bit; always false without per-vector masking. */
  masked(vector: number): boolean;
  /** Per-vector pending bit; always false without per-vector masking. */
  pending(vector: number): boolean;
}

export interface MsixView {
  readonly capOffset: number;
  readonly enabled: boolean;
  readonly functionMask: boolean;
  readonly vectors: number;
  readonly tableBar: number;
  readonly tableOffset: number;
  readonly pbaBar: number;
  readonly pbaOffset: number;
}

export interface PmView {
  readonly capOffset: number;
  /** 0 = D0, 3 = D3hot. */
  readonly powerState: number;
}

export interface PcieView {
  readonly capOffset: number;
}

/** Command bits the guest may set (spec: PCI 3.0, 6.2.2); the rest read 0. */
const COMMAND_WMASK =
  PciCommand.IO |
  PciCommand.MEMORY |
  PciCommand.MASTER |
  PciCommand.PARITY |
  PciCommand.SERR |
  PciCommand.INTX_DISABLE;

interface PlacedCapability {
  image: CapabilityImage;
  offset: number;
}

export class ConfigSpace {
  readonly size: number;
  readonly bars: readonly BarSpec[];
  readonly msi: MsiView | null;
  readonly msix: MsixView | null;
  readonly pm: PmView | null;
  readonly pcie: PcieView | null;

  private readonly cfg: Buffer;
  private readonly wmask: Uint8Array;
  private readonly w1cmask: Uint8Array;
  /** Read-only bits the device changes itself (interrupt status, pending bits). */
  private readonly dynmask: Uint8Array;
  private readonly powerOn: Uint8Array;
  private readonly caps: PlacedCapability[];
  /** Capabilities with read or write hooks (vendor capabilities of the device). */
  private readonly liveCaps: PlacedCapability[];
  /** BarSpec index for each of the six BAR dwords, or -1. */
  private readonly barOfDword: number[];

  constructor(spec: ConfigSpaceSpec) {
    validateSpec(spec);
    const caps = spec.capabilities ?? {};
    this.size = caps.pcie ? PCIE_CONFIG_SPACE_SIZE : PCI_CONFIG_SPACE_SIZE;
    this.cfg = Buffer.alloc(this.size);
    this.wmask = new Uint8Array(this.size);
    this.w1cmask = new Uint8Array(this.size);
    this.dynmask = new Uint8Array(this.size);
    this.bars = spec.bars.map((b) => ({ ...b }));
    this.barOfDword = new Array<number>(PCI_NUM_BARS).fill(-1);

    const c = this.cfg;
    c.writeUInt16LE(spec.vendorId, PciHeader.VENDOR_ID);
    c.writeUInt16LE(spec.deviceId, PciHeader.DEVICE_ID);
    this.setMask16(PciHeader.COMMAND, COMMAND_WMASK, 0);
    this.setMask16(PciHeader.STATUS, 0, PCI_STATUS_ERROR_BITS);
    this.dynmask[PciHeader.STATUS] = PciStatus.INTERRUPT;
    c[PciHeader.REVISION_ID] = spec.revision ?? 0;
    c[PciHeader.CLASS_PROG] = spec.classCode & 0xff;
    c.writeUInt16LE((spec.classCode >>> 8) & 0xffff, PciHeader.CLASS_DEVICE);
    this.wmask[PciHeader.CACHE_LINE_SIZE] = 0xff;
    this.wmask[PciHeader.LATENCY_TIMER] = 0xff;
    c[PciHeader.HEADER_TYPE] = PciHeaderType.NORMAL;
    c.writeUInt16LE(spec.subsystemVendorId ?? 0, PciHeader.SUBSYSTEM_VENDOR_ID);
    c.writeUInt16LE(spec.subsystemId ?? 0, PciHeader.SUBSYSTEM_ID);
    this.wmask[PciHeader.INTERRUPT_LINE] = 0xff;
    c[PciHeader.INTERRUPT_PIN] = spec.interruptPin ?? 0;

    for (const bar of this.bars) this.initBar(bar);

    const images: CapabilityImage[] = [];
    if (caps.pm) images.push(pmCapability());
    if (caps.msi) images.push(msiCapability(caps.msi));
    if (caps.msix) images.push(msixCapability(caps.msix));
    if (caps.pcie) images.push(pcieCapability());
    for (const v of caps.vendor ?? []) images.push(vendorCapability(v));
    const offsets = placeCapabilities(images.map((i) => i.size), CAPABILITY_LIST_START, PCI_CONFIG_SPACE_SIZE);
    this.caps = images.map((image, i) => ({ image, offset: offsets[i]! }));
    this.liveCaps = this.caps.filter((p) => p.image.onRead || p.image.onWrite);
    this.caps.forEach(({ image, offset }, i) => {
      c.set(image.bytes, offset);
      this.wmask.set(image.wmask, offset);
      this.w1cmask.set(image.w1cmask, offset);
      this.dynmask.set(image.dynmask, offset);
      c[offset + 1] = this.caps[i + 1]?.offset ?? 0;
    });
    if (this.caps.length > 0) {
      c[PciHeader.CAPABILITY_LIST] = this.caps[0]!.offset;
      c.writeUInt16LE(PciStatus.CAP_LIST, PciHeader.STATUS);
    }
    // Extended space, when present, stays zero: a null header at 0x100 ends the list.

    this.powerOn = Uint8Array.from(c);
    this.msi = this.makeMsiView(caps.msi);
    this.msix = this.makeMsixView();
    this.pm = this.makePmView();
    const pcie = this.capOffset("pcie");
    this.pcie = pcie === null ? null : { capOffset: pcie };
  }

  /** A copy of `length` bytes at `offset`. */
  read(offset: number, length: number): Buffer {
    this.checkRange(offset, length);
    const out = Buffer.from(this.cfg.subarray(offset, offset + length));
    for (const p of this.liveCaps) {
      if (!p.image.onRead) continue;
      const lo = Math.max(offset, p.offset);
      const hi = Math.min(offset + length, p.offset + p.image.size);
      if (lo < hi) p.image.onRead(lo - p.offset, out.subarray(lo - offset, hi - offset), this.capBytes(p));
    }
    return out;
  }

  /** A guest write: masks applied byte by byte, then capability rules. */
  write(offset: number, data: Uint8Array): ConfigWriteEffects {
    this.checkRange(offset, data.length);
    const end = offset + data.length;
    // Capability rules may touch bytes of a capability outside the written
    // range; compare over the union so effects see every change.
    let lo = offset;
    let hi = end;
    const touched = this.caps.filter((p) => p.offset < end && p.offset + p.image.size > offset);
    for (const p of touched) {
      lo = Math.min(lo, p.offset);
      hi = Math.max(hi, p.offset + p.image.size);
    }
    const before = Uint8Array.from(this.cfg.subarray(lo, hi));

    const c = this.cfg;
    for (let i = 0; i < data.length; i++) {
      const o = offset + i;
      const d = data[i]!;
      const wm = this.wmask[o]!;
      c[o] = ((c[o]! & ~wm) | (d & wm)) & ~(d & this.w1cmask[o]!);
    }
    for (const p of touched) {
      p.image.afterWrite?.(
        c.subarray(p.offset, p.offset + p.image.size),
        before.subarray(p.offset - lo, p.offset - lo + p.image.size),
      );
    }
    for (const p of touched) {
      if (!p.image.onWrite) continue;
      const from = Math.max(offset, p.offset);
      p.image.onWrite(from - p.offset, Math.min(end, p.offset + p.image.size) - from, this.capBytes(p));
    }

    const effects: ConfigWriteEffects = { commandChanged: false, barsChanged: [], msiChanged: false, msixChanged: false };
    const msi = this.msi?.capOffset ?? -1;
    const msix = this.msix?.capOffset ?? -1;
    const msiEnd = msi < 0 ? -1 : msi + this.capSize("msi");
    const msixEnd = msix < 0 ? -1 : msix + PciMsix.SIZEOF;
    for (let o = lo; o < hi; o++) {
      if (c[o] === before[o - lo]) continue;
      if (o === PciHeader.COMMAND || o === PciHeader.COMMAND + 1) effects.commandChanged = true;
      else if (o >= PciHeader.BASE_ADDRESS_0 && o < barOffset(PCI_NUM_BARS)) {
        const bar = this.barOfDword[(o - PciHeader.BASE_ADDRESS_0) >> 2]!;
        if (bar >= 0 && !effects.barsChanged.includes(bar)) effects.barsChanged.push(bar);
      } else if (o >= msi && o < msiEnd) effects.msiChanged = true;
      else if (o >= msix && o < msixEnd) effects.msixChanged = true;
    }
    effects.barsChanged.sort((a, b) => a - b);
    return effects;
  }

  /** Back to power-on values. */
  reset(): void {
    this.cfg.set(this.powerOn);
  }

  /** The raw bytes, for migration. */
  snapshot(): Uint8Array {
    return Uint8Array.from(this.cfg);
  }

  /**
   * Load bytes from `snapshot()`. Throws if the size differs or any read-only
   * byte (identity, BAR types, capability layout) differs from this device's.
   */
  restore(bytes: Uint8Array): void {
    if (bytes.length !== this.size) {
      throw new Error(`config space snapshot is ${bytes.length} bytes, expected ${this.size}`);
    }
    const snap = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    const ident = (b: Uint8Array) => {
      const v = Buffer.from(b.buffer, b.byteOffset, b.byteLength);
      return (
        `vendor 0x${hex(v.readUInt16LE(PciHeader.VENDOR_ID), 4)} device 0x${hex(v.readUInt16LE(PciHeader.DEVICE_ID), 4)}` +
        ` class 0x${hex(v.readUInt32LE(PciHeader.REVISION_ID) >>> 8, 6)} rev 0x${hex(v[PciHeader.REVISION_ID]!, 2)}` +
        ` subsystem 0x${hex(v.readUInt16LE(PciHeader.SUBSYSTEM_VENDOR_ID), 4)}:0x${hex(v.readUInt16LE(PciHeader.SUBSYSTEM_ID), 4)}`
      );
    };
    const mine = ident(this.powerOn);
    const theirs = ident(snap);
    if (mine !== theirs) throw new Error(`config space snapshot is for ${theirs}, this device is ${mine}`);
    for (let o = 0; o < this.size; o++) {
      const fixed = ~(this.wmask[o]! | this.w1cmask[o]! | this.dynmask[o]!) & 0xff;
      if ((snap[o]! & fixed) !== (this.powerOn[o]! & fixed)) {
        throw new Error(
          `config space snapshot differs in read-only bits at 0x${hex(o, 2)}: ` +
            `0x${hex(snap[o]!, 2)} vs 0x${hex(this.powerOn[o]!, 2)}`,
        );
      }
    }
    this.cfg.set(snap);
  }

  get command(): number {
    return this.cfg.readUInt16LE(PciHeader.COMMAND);
  }

  get status(): number {
    return this.cfg.readUInt16LE(PciHeader.STATUS);
  }

  get memoryEnabled(): boolean {
    return (this.command & PciCommand.MEMORY) !== 0;
  }

  get ioEnabled(): boolean {
    return (this.command & PciCommand.IO) !== 0;
  }

  get busMaster(): boolean {
    return (this.command & PciCommand.MASTER) !== 0;
  }

  get intxDisabled(): boolean {
    return (this.command & PciCommand.INTX_DISABLE) !== 0;
  }

  get interruptPin(): number {
    return this.cfg[PciHeader.INTERRUPT_PIN]!;
  }

  /** Status bit 3, set while the function asserts INTx; read-only to the guest. */
  setInterruptStatus(asserted: boolean): void {
    const s = this.cfg[PciHeader.STATUS]!;
    this.cfg[PciHeader.STATUS] = asserted ? s | PciStatus.INTERRUPT : s & ~PciStatus.INTERRUPT;
  }

  /**
   * Record an error condition in the status register (e.g. REC_MASTER_ABORT
   * after a failed DMA). Only the write-1-to-clear error bits are accepted.
   */
  signalStatus(bits: number): void {
    if ((bits & ~PCI_STATUS_ERROR_BITS) !== 0) {
      throw new RangeError(`not a status error bit: 0x${hex(bits & ~PCI_STATUS_ERROR_BITS, 4)}`);
    }
    this.cfg.writeUInt16LE(this.status | bits, PciHeader.STATUS);
  }

  /** Set or clear an MSI pending bit (needs per-vector masking). */
  setMsiPending(vector: number, on: boolean): void {
    const msi = this.msi;
    if (!msi || !msi.perVectorMask) throw new Error("MSI per-vector masking is not present");
    checkVector(vector, msi.vectors);
    const at = msi.capOffset + PciMsi.PENDING_64;
    const bit = 1 << vector;
    const v = this.cfg.readUInt32LE(at);
    this.cfg.writeUInt32LE((on ? v | bit : v & ~bit) >>> 0, at);
  }

  /**
   * The address a BAR is programmed with, type bits removed. `index` must be
   * the first slot of a declared BAR.
   */
  barAddress(index: number): bigint {
    const bar = this.bars.find((b) => b.index === index);
    if (!bar) throw new RangeError(`BAR ${index} is not implemented`);
    const lo = this.cfg.readUInt32LE(barOffset(index));
    switch (bar.kind) {
      case "io":
        return BigInt((lo & PciBaseAddress.IO_MASK) >>> 0);
      case "mem32":
        return BigInt((lo & PciBaseAddress.MEM_MASK) >>> 0);
      case "mem64": {
        const hi = this.cfg.readUInt32LE(barOffset(index + 1));
        return (BigInt(hi) << 32n) | BigInt((lo & PciBaseAddress.MEM_MASK) >>> 0);
      }
    }
  }

  /** Offset of a capability, or null when absent. */
  capOffset(name: CapabilityName): number | null {
    return this.caps.find((p) => p.image.name === name)?.offset ?? null;
  }

  /** A copy of a capability's stored bytes, for its hooks. */
  private capBytes(p: PlacedCapability): Buffer {
    return Buffer.from(this.cfg.subarray(p.offset, p.offset + p.image.size));
  }

  private capSize(name: CapabilityName): number {
    return this.caps.find((p) => p.image.name === name)?.image.size ?? 0;
  }

  private initBar(bar: BarSpec): void {
    const at = barOffset(bar.index);
    // Writable address bits: those above the size, within the BAR's width.
    const width = bar.kind === "mem64" ? 64n : 32n;
    const lowBits = bar.kind === "io" ? 0x3n : 0xfn;
    const mask = ~(bar.size - 1n) & ((1n << width) - 1n) & ~lowBits;
    let flags: number;
    if (bar.kind === "io") flags = PciBaseAddress.SPACE_IO;
    else {
      flags = bar.kind === "mem64" ? PciBaseAddress.MEM_TYPE_64 : PciBaseAddress.MEM_TYPE_32;
      if (bar.prefetchable) flags |= PciBaseAddress.MEM_PREFETCH;
    }
    this.cfg.writeUInt32LE(flags, at);
    this.setMask32(at, Number(mask & 0xffff_ffffn), 0);
    this.barOfDword[bar.index] = bar.index;
    if (bar.kind === "mem64") {
      this.setMask32(at + 4, Number(mask >> 32n), 0);
      this.barOfDword[bar.index + 1] = bar.index;
    }
  }

  private setMask16(at: number, wmask: number, w1c: number): void {
    this.wmask[at] = wmask & 0xff;
    this.wmask[at + 1] = (wmask >>> 8) & 0xff;
    this.w1cmask[at] = w1c & 0xff;
    this.w1cmask[at + 1] = (w1c >>> 8) & 0xff;
  }

  private setMask32(at: number, wmask: number, w1c: number): void {
    this.setMask16(at, wmask & 0xffff, w1c & 0xffff);
    this.setMask16(at + 2, wmask >>> 16, w1c >>> 16);
  }

  private checkRange(offset: number, length: number): void {
    if (!Number.isInteger(offset) || !Number.isInteger(length) || offset < 0 || length < 0 || offset + length > this.size) {
      throw new RangeError(`config space access out of range: offset ${offset} length ${length} (size ${this.size})`);
    }
  }

  private makeMsiView(opts: { vectors: number; perVectorMask?: boolean } | undefined): MsiView | null {
    const at = this.capOffset("msi");
    if (at === null || !opts) return null;
    const c = this.cfg;
    const flags = () => c.readUInt16LE(at + PciMsi.FLAGS);
    const pvm = opts.perVectorMask === true;
    const vectors = opts.vectors;
    return {
      capOffset: at,
      vectors,
      perVectorMask: pvm,
      get enabled() {
        return (flags() & PciMsi.FLAGS_ENABLE) !== 0;
      },
      get address() {
        return (BigInt(c.readUInt32LE(at + PciMsi.ADDRESS_HI)) << 32n) | BigInt(c.readUInt32LE(at + PciMsi.ADDRESS_LO));
      },
      get data() {
        return c.readUInt16LE(at + PciMsi.DATA_64);
      },
      get enabledVectors() {
        return 1 << ((flags() & PciMsi.FLAGS_QSIZE) >> PciMsi.FLAGS_QSIZE_SHIFT);
      },
      masked(vector: number) {
        checkVector(vector, vectors);
        return pvm && ((c.readUInt32LE(at + PciMsi.MASK_64) >>> vector) & 1) === 1;
      },
      pending(vector: number) {
        checkVector(vector, vectors);
        return pvm && ((c.readUInt32LE(at + PciMsi.PENDING_64) >>> vector) & 1) === 1;
      },
    };
  }

  private makeMsixView(): MsixView | null {
    const at = this.capOffset("msix");
    if (at === null) return null;
    const c = this.cfg;
    const flags = () => c.readUInt16LE(at + PciMsix.FLAGS);
    const table = c.readUInt32LE(at + PciMsix.TABLE);
    const pba = c.readUInt32LE(at + PciMsix.PBA);
    return {
      capOffset: at,
      vectors: (flags() & PciMsix.FLAGS_QSIZE) + 1,
      tableBar: table & PciMsix.BIR_MASK,
      tableOffset: (table & PciMsix.OFFSET_MASK) >>> 0,
      pbaBar: pba & PciMsix.BIR_MASK,
      pbaOffset: (pba & PciMsix.OFFSET_MASK) >>> 0,
      get enabled() {
        return (flags() & PciMsix.FLAGS_ENABLE) !== 0;
      },
      get functionMask() {
        return (flags() & PciMsix.FLAGS_MASKALL) !== 0;
      },
    };
  }

  private makePmView(): PmView | null {
    const at = this.capOffset("pm");
    if (at === null) return null;
    const c = this.cfg;
    return {
      capOffset: at,
      get powerState() {
        return c.readUInt16LE(at + PciPm.CTRL) & PciPm.CTRL_STATE_MASK;
      },
    };
  }
}

function hex(n: number, width: number): string {
  return n.toString(16).padStart(width, "0");
}

function checkVector(vector: number, vectors: number): void {
  if (!Number.isInteger(vector) || vector < 0 || vector >= vectors) {
    throw new RangeError(`vector ${vector} out of range 0..${vectors - 1}`);
  }
}

function isPowerOfTwo(n: bigint): boolean {
  return n > 0n && (n & (n - 1n)) === 0n;
}

function checkField(name: string, value: number | undefined, bits: number): void {
  if (value === undefined) return;
  if (!Number.isInteger(value) || value < 0 || value >= 2 ** bits) {
    throw new RangeError(`${name} must be a ${bits}-bit unsigned integer, got ${value}`);
  }
}

function validateSpec(spec: ConfigSpaceSpec): void {
  checkField("vendorId", spec.vendorId, 16);
  checkField("deviceId", spec.deviceId, 16);
  // spec: PCI 3.0, 6.2.1: 0xffff is what an absent function reads.
  if (spec.vendorId === 0xffff) throw new RangeError("vendorId 0xffff is reserved");
  checkField("subsystemVendorId", spec.subsystemVendorId, 16);
  checkField("subsystemId", spec.subsystemId, 16);
  checkField("classCode", spec.classCode, 24);
  checkField("revision", spec.revision, 8);
  checkField("interruptPin", spec.interruptPin, 8);
  if ((spec.interruptPin ?? 0) > 4) throw new RangeError(`interruptPin must be 0..4, got ${spec.interruptPin}`);

  const used = new Array<BarSpec | undefined>(PCI_NUM_BARS).fill(undefined);
  for (const bar of spec.bars) {
    if (!Number.isInteger(bar.index) || bar.index < 0 || bar.index >= PCI_NUM_BARS) {
      throw new RangeError(`BAR index must be 0..5, got ${bar.index}`);
    }
    if (!isPowerOfTwo(bar.size)) throw new RangeError(`BAR ${bar.index} size ${bar.size} is not a power of two`);
    const slots = bar.kind === "mem64" ? [bar.index, bar.index + 1] : [bar.index];
    if (bar.kind === "mem64" && bar.index === PCI_NUM_BARS - 1) throw new RangeError("a mem64 BAR cannot start at index 5");
    for (const s of slots) {
      if (used[s]) throw new RangeError(`BAR slot ${s} is used twice`);
      used[s] = bar;
    }
    switch (bar.kind) {
      case "io":
        // spec: PCI 3.0, 6.2.5.1: at most 256 bytes per I/O BAR.
        if (bar.size < 4n || bar.size > 256n) throw new RangeError(`io BAR ${bar.index} size must be 4..256`);
        if (bar.prefetchable) throw new RangeError(`io BAR ${bar.index} cannot be prefetchable`);
        break;
      case "mem32":
        if (bar.size < 16n || bar.size > 1n << 31n) throw new RangeError(`mem32 BAR ${bar.index} size must be 16..2^31`);
        break;
      case "mem64":
        if (bar.size < 16n || bar.size > 1n << 63n) throw new RangeError(`mem64 BAR ${bar.index} size must be 16..2^63`);
        break;
      default:
        throw new RangeError(`BAR ${(bar as BarSpec).index} has unknown kind ${(bar as BarSpec).kind}`);
    }
  }

  const msix = spec.capabilities?.msix;
  if (msix) {
    const region = (what: string, barIndex: number, offset: number, size: number) => {
      const bar = spec.bars.find((b) => b.index === barIndex);
      if (!bar || bar.kind === "io") throw new RangeError(`MSI-X ${what} BAR ${barIndex} is not a memory BAR`);
      if (BigInt(offset) + BigInt(size) > bar.size) throw new RangeError(`MSI-X ${what} does not fit in BAR ${barIndex}`);
      return { barIndex, start: offset, end: offset + size };
    };
    const t = region("table", msix.tableBar, msix.tableOffset, msix.vectors * PciMsix.ENTRY_SIZE);
    const p = region("PBA", msix.pbaBar, msix.pbaOffset, Math.ceil(msix.vectors / 64) * 8);
    if (t.barIndex === p.barIndex && t.start < p.end && p.start < t.end) {
      throw new RangeError("MSI-X table and PBA overlap");
    }
  }
}

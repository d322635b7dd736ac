/**
 * The standard capabilities a ConfigSpace can carry, each built as an image:
 * power-on bytes plus per-byte masks (guest-writable, write-1-to-clear, and
 * read-only bits the device changes itself). ConfigSpace places the images in
 * the list at 0x40 and applies the masks; rules that masks cannot express
 * (MSI's enable clamp, PM's unsupported states) live here in `afterWrite`.
 */
import type { VendorCapability } from "../device/api.ts";
import { PciCap, PciCapId, PciExp, PciMsi, PciMsix, PciPm, PciHeader, PciStatus } from "./registers.ts";

export type CapabilityName = "pm" | "msi" | "msix" | "pcie" | "vendor";

export interface CapabilityImage {
  readonly id: number;
  readonly name: CapabilityName;
  /** Bytes the capability occupies; a multiple of 4. */
  readonly size: number;
  /** Power-on contents; the next pointer (byte 1) is filled in by placement. */
  readonly bytes: Uint8Array;
  /** Bits the guest may write. */
  readonly wmask: Uint8Array;
  /** Bits the guest clears by writing 1. */
  readonly w1cmask: Uint8Array;
  /** Read-only bits the device itself changes (excluded from restore checks). */
  readonly dynmask: Uint8Array;
  /**
   * Rules beyond the masks, run after a guest write touched the capability.
   * `cap` is the live capability in config space, `before` its bytes before
   * the write.
   */
  afterWrite?(cap: Uint8Array, before: Uint8Array): void;
  /** Live contents: `data` holds the stored bytes read from `offset` (within the capability) and may be changed. */
  onRead?(offset: number, data: Buffer, cap: Buffer): void;
  /** After a guest write of `length` bytes at `offset` (within the capability), masks and afterWrite applied. */
  onWrite?(offset: number, length: number, cap: Buffer): void;
}

/** First offset available to capabilities: just past the type-0 header. */
export const CAPABILITY_LIST_START = 0x40;

class ImageBuilder {
  readonly bytes: Uint8Array;
  readonly wmask: Uint8Array;
  readonly w1cmask: Uint8Array;
  readonly dynmask: Uint8Array;

  constructor(id: number, readonly size: number) {
    this.bytes = new Uint8Array(size);
    this.wmask = new Uint8Array(size);
    this.w1cmask = new Uint8Array(size);
    this.dynmask = new Uint8Array(size);
    this.bytes[PciCap.LIST_ID] = id;
  }

  u16(offset: number, value: number, wmask = 0, w1c = 0, dyn = 0): this {
    return this.put(offset, 2, value, wmask, w1c, dyn);
  }

  u32(offset: number, value: number, wmask = 0, w1c = 0, dyn = 0): this {
    return this.put(offset, 4, value, wmask, w1c, dyn);
  }

  private put(offset: number, width: number, value: number, wmask: number, w1c: number, dyn: number): this {
    for (let i = 0; i < width; i++) {
      const shift = 8 * i;
      this.bytes[offset + i] = (value >>> shift) & 0xff;
      this.wmask[offset + i] = (wmask >>> shift) & 0xff;
      this.w1cmask[offset + i] = (w1c >>> shift) & 0xff;
      this.dynmask[offset + i] = (dyn >>> shift) & 0xff;
    }
    return this;
  }
}

function u16At(b: Uint8Array, offset: number): number {
  return b[offset]! | (b[offset + 1]! << 8);
}

function setU16At(b: Uint8Array, offset: number, value: number): void {
  b[offset] = value & 0xff;
  b[offset + 1] = (value >>> 8) & 0xff;
}

/**
 * Power management, PM 1.2 (version 3), D0 and D3hot only. No_Soft_Reset is
 * set: this framework keeps config space across D3hot -> D0. No PME.
 */
export function pmCapability(): CapabilityImage {
  const b = new ImageBuilder(PciCapId.PM, PciPm.SIZEOF)
    .u16(PciPm.PMC, 3)
    .u16(PciPm.CTRL, PciPm.CTRL_NO_SOFT_RESET | PciPm.D0, PciPm.CTRL_STATE_MASK);
  return {
    id: PciCapId.PM,
    name: "pm",
    size: PciPm.SIZEOF,
    ...images(b),
    afterWrite(cap, before) {
      // spec: PM 1.2, 3.2.4: a write of an unsupported state is ignored.
      const state = u16At(cap, PciPm.CTRL) & PciPm.CTRL_STATE_MASK;
      if (state === PciPm.D1 || state === PciPm.D2) {
        const old = u16At(before, PciPm.CTRL) & PciPm.CTRL_STATE_MASK;
        setU16At(cap, PciPm.CTRL, (u16At(cap, PciPm.CTRL) & ~PciPm.CTRL_STATE_MASK) | old);
      }
    },
  };
}

export interface MsiOptions {
  vectors: 1 | 2 | 4 | 8 | 16 | 32;
  perVectorMask?: boolean;
}

/** log2 of a power of two up to 32. */
function log2(n: number): number {
  return 31 - Math.clz32(n);
}

/** MSI, 64-bit address capable, optional per-vector masking. */
export function msiCapability(opts: MsiOptions): CapabilityImage {
  const { vectors } = opts;
  if (![1, 2, 4, 8, 16, 32].includes(vectors)) {
    throw new RangeError(`MSI vectors must be a power of two from 1 to 32, got ${vectors}`);
  }
  const pvm = opts.perVectorMask === true;
  const size = pvm ? PciMsi.SIZEOF_64_MASK : PciMsi.SIZEOF_64;
  const mmc = log2(vectors);
  const flags = PciMsi.FLAGS_64BIT | (mmc << PciMsi.FLAGS_QMASK_SHIFT) | (pvm ? PciMsi.FLAGS_MASKBIT : 0);
  const b = new ImageBuilder(PciCapId.MSI, size)
    .u16(PciMsi.FLAGS, flags, PciMsi.FLAGS_ENABLE | (mmc > 0 ? PciMsi.FLAGS_QSIZE : 0))
    .u32(PciMsi.ADDRESS_LO, 0, PciMsi.ADDRESS_LO_MASK)
    .u32(PciMsi.ADDRESS_HI, 0, 0xffff_ffff)
    // Extended message data (bytes 14-15) is not capable: read-only 0.
    .u16(PciMsi.DATA_64, 0, 0xffff);
  if (pvm) {
    // Only the bits of implemented vectors exist (spec: PCI 3.0, 6.8.1.7).
    const implemented = vectors === 32 ? 0xffff_ffff : (1 << vectors) - 1;
    b.u32(PciMsi.MASK_64, 0, implemented);
    b.u32(PciMsi.PENDING_64, 0, 0, 0, implemented);
  }
  return {
    id: PciCapId.MSI,
    name: "msi",
    size,
    ...images(b),
    afterWrite(cap) {
      // spec: PCI 3.0, 6.8.1.3: MME may not exceed MMC; clamp it.
      const f = u16At(cap, PciMsi.FLAGS);
      const mme = (f & PciMsi.FLAGS_QSIZE) >> PciMsi.FLAGS_QSIZE_SHIFT;
      if (mme > mmc) {
        setU16At(cap, PciMsi.FLAGS, (f & ~PciMsi.FLAGS_QSIZE) | (mmc << PciMsi.FLAGS_QSIZE_SHIFT));
      }
    },
  };
}

export interface MsixOptions {
  vectors: number;
  tableBar: number;
  tableOffset: number;
  pbaBar: number;
  pbaOffset: number;
}

/** MSI-X: table size, table and PBA locations read-only; enable and function mask writable. */
export function msixCapability(opts: MsixOptions): CapabilityImage {
  const { vectors, tableBar, tableOffset, pbaBar, pbaOffset } = opts;
  if (!Number.isInteger(vectors) || vectors < 1 || vectors > PciMsix.MAX_VECTORS) {
    throw new RangeError(`MSI-X vectors must be 1..${PciMsix.MAX_VECTORS}, got ${vectors}`);
  }
  for (const [what, bar, off] of [
    ["table", tableBar, tableOffset],
    ["PBA", pbaBar, pbaOffset],
  ] as const) {
    if (!Number.isInteger(bar) || bar < 0 || bar > 5) throw new RangeError(`MSI-X ${what} BAR must be 0..5, got ${bar}`);
    if (!Number.isInteger(off) || off < 0 || off > 0xffff_ffff || off % 8 !== 0) {
      throw new RangeError(`MSI-X ${what} offset must be a multiple of 8 below 2^32, got ${off}`);
    }
  }
  const b = new ImageBuilder(PciCapId.MSIX, PciMsix.SIZEOF)
    .u16(PciMsix.FLAGS, vectors - 1, PciMsix.FLAGS_ENABLE | PciMsix.FLAGS_MASKALL)
    .u32(PciMsix.TABLE, (tableOffset | tableBar) >>> 0)
    .u32(PciMsix.PBA, (pbaOffset | pbaBar) >>> 0);
  return { id: PciCapId.MSIX, name: "msix", size: PciMsix.SIZEOF, ...images(b) };
}

/**
 * PCI Express capability, version 2, endpoint, x1 at 2.5 GT/s, 128-byte
 * payload. Guest-writable: error reporting enables, relaxed ordering, no
 * snoop, max read request size; link control RCB/CCC/ES. Device status error
 * bits are write-1-to-clear.
 */
export function pcieCapability(): CapabilityImage {
  const devctlW =
    PciExp.DEVCTL_CERE |
    PciExp.DEVCTL_NFERE |
    PciExp.DEVCTL_FERE |
    PciExp.DEVCTL_URRE |
    PciExp.DEVCTL_RELAX_EN |
    PciExp.DEVCTL_NOSNOOP_EN |
    PciExp.DEVCTL_READRQ;
  const devstaW1c = PciExp.DEVSTA_CED | PciExp.DEVSTA_NFED | PciExp.DEVSTA_FED | PciExp.DEVSTA_URD;
  const b = new ImageBuilder(PciCapId.EXP, PciExp.SIZEOF_V2)
    .u16(PciExp.FLAGS, PciExp.FLAGS_VER2 | (PciExp.TYPE_ENDPOINT << PciExp.FLAGS_TYPE_SHIFT))
    .u32(PciExp.DEVCAP, PciExp.DEVCAP_RBER)
    // spec: PCIe 3.0, 7.8.4: relaxed ordering and no snoop enabled, MRRS 512 at reset.
    .u16(PciExp.DEVCTL, PciExp.DEVCTL_RELAX_EN | PciExp.DEVCTL_NOSNOOP_EN | PciExp.DEVCTL_READRQ_512B, devctlW)
    .u16(PciExp.DEVSTA, 0, 0, devstaW1c, devstaW1c)
    .u32(PciExp.LNKCAP, PciExp.LNKCAP_SLS_2_5GB | (1 << PciExp.LNKCAP_MLW_SHIFT))
    .u16(PciExp.LNKCTL, 0, PciExp.LNKCTL_RCB | PciExp.LNKCTL_CCC | PciExp.LNKCTL_ES)
    .u16(PciExp.LNKSTA, PciExp.LNKSTA_CLS_2_5GB | PciExp.LNKSTA_NLW_X1)
    .u32(PciExp.LNKCAP2, PciExp.LNKCAP2_SLS_2_5GB)
    .u16(PciExp.LNKCTL2, PciExp.LNKCTL2_TLS_2_5GT);
  return { id: PciCapId.EXP, name: "pcie", size: PciExp.SIZEOF_V2, ...images(b) };
}

/** Largest vendor capability: what fits between the header and the end of conventional config space. */
export const VENDOR_CAPABILITY_MAX = 0x100 - CAPABILITY_LIST_START;

/**
 * A device's vendor-specific capability (ID 0x09): its own bytes and
 * writable bits, byte 1 (next pointer) left to placement, and the device's
 * read and write hooks passed through.
 */
export function vendorCapability(def: VendorCapability): CapabilityImage {
  const size = def.bytes.length;
  if (size < 3 || size > VENDOR_CAPABILITY_MAX) throw new RangeError(`vendor capability of ${size} bytes; it must be 3..${VENDOR_CAPABILITY_MAX}`);
  if (def.bytes[PciCap.LIST_ID] !== PciCapId.VNDR) {
    throw new RangeError(`vendor capability starts with ID 0x${def.bytes[0]!.toString(16)}, expected 0x${PciCapId.VNDR.toString(16)}`);
  }
  if (def.writable !== undefined && def.writable.length !== size) {
    throw new RangeError(`vendor capability: writable mask of ${def.writable.length} bytes for ${size} bytes`);
  }
  // dword multiple, so the next capability stays aligned; the padding reads 0
  const padded = (size + 3) & ~3;
  const bytes = new Uint8Array(padded);
  bytes.set(def.bytes);
  bytes[PciCap.LIST_NEXT] = 0;
  const wmask = new Uint8Array(padded);
  if (def.writable) wmask.set(def.writable);
  // the ID and the next pointer are never the guest's
  wmask[PciCap.LIST_ID] = 0;
  wmask[PciCap.LIST_NEXT] = 0;
  const image: CapabilityImage = { id: PciCapId.VNDR, name: "vendor", size: padded, bytes, wmask, w1cmask: new Uint8Array(padded), dynmask: new Uint8Array(padded) };
  return {
    ...image,
    ...(def.read ? { onRead: (o: number, d: Buffer, cap: Buffer) => def.read!(o, d, cap) } : {}),
    ...(def.write ? { onWrite: (o: number, n: number, cap: Buffer) => def.write!(o, n, cap) } : {}),
  };
}

function images(b: ImageBuilder) {
  return { bytes: b.bytes, wmask: b.wmask, w1cmask: b.w1cmask, dynmask: b.dynmask };
}

/**
 * Offsets for capabilities of the given sizes, packed upward from `start`,
 * each dword aligned (spec: PCI 3.0, 6.7). Throws if they do not fit below `end`.
 */
export function placeCapabilities(sizes: readonly number[], start = CAPABILITY_LIST_START, end = 0x100): number[] {
  const offsets: number[] = [];
  let at = start;
  for (const size of sizes) {
    at = (at + 3) & ~3;
    if (at + size > end) throw new RangeError(`capabilities do not fit in config space below 0x${end.toString(16)}`);
    offsets.push(at);
    at += size;
  }
  return offsets;
}

export interface CapabilityEntry {
  id: number;
  offset: number;
}

/**
 * Walk the capability list as a guest would: status CAP_LIST, pointer at
 * 0x34, then next pointers with the low two bits ignored. Throws on a loop or
 * a pointer into the header.
 */
export function walkCapabilities(read8: (offset: number) => number): CapabilityEntry[] {
  const status = read8(PciHeader.STATUS);
  if ((status & PciStatus.CAP_LIST) === 0) return [];
  const entries: CapabilityEntry[] = [];
  const seen = new Set<number>();
  let ptr = read8(PciHeader.CAPABILITY_LIST) & 0xfc;
  while (ptr !== 0) {
    if (ptr < CAPABILITY_LIST_START) throw new Error(`capability pointer 0x${ptr.toString(16)} points into the header`);
    if (seen.has(ptr)) throw new Error(`capability list loops at 0x${ptr.toString(16)}`);
    seen.add(ptr);
    entries.push({ id: read8(ptr + PciCap.LIST_ID), offset: ptr });
    ptr = read8(ptr + PciCap.LIST_NEXT) & 0xfc;
  }
  return entries;
}

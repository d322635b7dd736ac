/**
 * PCI configuration helpers for a q35 machine driven over qtest, using
 * configuration mechanism #1 (address to port 0xcf8, data at 0xcfc-0xcff).
 * It reaches the first 256 bytes of config space; PCIe extended config would
 * need MMCONFIG, which no firmware has enabled under accel=qtest.
 *
 * A `bdf` is `bus << 8 | device << 3 | function` (see `bdf()`).
 *
 * Address map for BARs (q35, accel=qtest, QEMU 11.1.3, measured with `info
 * mtree`): the PCI memory space sits under all of system memory at priority
 * -1, so any address not claimed by RAM or a chipset device decodes to PCI.
 * Below 4 GiB: RAM ends at `min(memMiB, 2 GiB)`; MMCONFIG (0xb0000000, 256
 * MiB) is disabled until the PCIEXBAR register enables it; the IOAPIC is at
 * 0xfec00000, HPET 0xfed00000, LAPIC 0xfee00000 and the BIOS ROM ends at
 * 4 GiB. `PCI_MMIO32_BASE`..`PCI_MMIO32_END` (0xe0000000..0xfec00000) avoids
 * all of them. 64-bit BARs can go at `PCI_MMIO64_BASE` (64 GiB), far above
 * any RAM the tests configure.
 */
import type { Qtest } from "./qtest.ts";

export const PCI_MMIO32_BASE = 0xe000_0000n;
export const PCI_MMIO32_END = 0xfec0_0000n;
export const PCI_MMIO64_BASE = 0x10_0000_0000n;
export const PCI_MMIO64_END = 0x80_0000_0000n;

// Config space offsets and bits used here.
export const PCI_VENDOR_ID = 0x00;
export const PCI_DEVICE_ID = 0x02;
export const PCI_COMMAND = 0x04;
export const PCI_STATUS = 0x06;
export const PCI_CLASS_REVISION = 0x08;
export const PCI_HEADER_TYPE = 0x0e;
export const PCI_BAR0 = 0x10;
export const PCI_CAPABILITY_LIST = 0x34;
export const PCI_INTERRUPT_LINE = 0x3c;
export const PCI_INTERRUPT_PIN = 0x3d;
export const PCI_COMMAND_IO = 0x1;
export const PCI_COMMAND_MEMORY = 0x2;
export const PCI_COMMAND_MASTER = 0x4;
export const PCI_COMMAND_INTX_DISABLE = 0x400;
export const PCI_STATUS_INTERRUPT = 0x8;
export const PCI_STATUS_CAP_LIST = 0x10;

const CONFIG_ADDRESS = 0xcf8;
const CONFIG_DATA = 0xcfc;

export function bdf(bus: number, dev: number, fn = 0): number {
  if (!(bus >= 0 && bus < 256 && dev >= 0 && dev < 32 && fn >= 0 && fn < 8)) {
    throw new RangeError(`pci: bad address ${bus}:${dev}.${fn}`);
  }
  return (bus << 8) | (dev << 3) | fn;
}

/** `bb:dd.f` in hex, as lspci prints it. */
export function formatBdf(b: number): string {
  const h = (v: number, w: number) => v.toString(16).padStart(w, "0");
  return `${h(b >> 8, 2)}:${h((b >> 3) & 0x1f, 2)}.${b & 7}`;
}

// Config access is two qtest commands (address, then data); a per-connection
// lock keeps concurrent callers from interleaving them.
const locks = new WeakMap<Qtest, Promise<unknown>>();

function locked<T>(qt: Qtest, fn: () => Promise<T>): Promise<T> {
  const prev = locks.get(qt) ?? Promise.resolve();
  const next = prev.then(fn, fn);
  locks.set(
    qt,
    next.then(
      () => undefined,
      () => undefined,
    ),
  );
  return next;
}

function cfgAddress(b: number, off: number, width: 1 | 2 | 4): number {
  if (!Number.isInteger(b) || b < 0 || b > 0xffff) throw new RangeError(`pci: bad bdf ${b}`);
  if (!Number.isInteger(off) || off < 0 || off + width > 256) {
    throw new RangeError(`pci: config offset ${off} (+${width}) outside the 256-byte space reachable through 0xcf8`);
  }
  if (off % width !== 0) throw new RangeError(`pci: config offset 0x${off.toString(16)} is not ${width}-byte aligned`);
  return (0x8000_0000 | (b << 8) | (off & 0xfc)) >>> 0;
}

export function cfgRead8(qt: Qtest, b: number, off: number): Promise<number> {
  const a = cfgAddress(b, off, 1);
  return locked(qt, async () => {
    await qt.outl(CONFIG_ADDRESS, a);
    return qt.inb(CONFIG_DATA + (off & 3));
  });
}

export function cfgRead16(qt: Qtest, b: number, off: number): Promise<number> {
  const a = cfgAddress(b, off, 2);
  return locked(qt, async () => {
    await qt.outl(CONFIG_ADDRESS, a);
    return qt.inw(CONFIG_DATA + (off & 2));
  });
}

export function cfgRead32(qt: Qtest, b: number, off: number): Promise<number> {
  const a = cfgAddress(b, off, 4);
  return locked(qt, async () => {
    await qt.outl(CONFIG_ADDRESS, a);
    return qt.inl(CONFIG_DATA);
  });
}

export function cfgWrite8(qt: Qtest, b: number, off: number, value: number): Promise<void> {
  const a = cfgAddress(b, off, 1);
  return locked(qt, async () => {
    await qt.outl(CONFIG_ADDRESS, a);
    await qt.outb(CONFIG_DATA + (off & 3), value);
  });
}

export function cfgWrite16(qt: Qtest, b: number, off: number, value: number): Promise<void> {
  const a = cfgAddress(b, off, 2);
  return locked(qt, async () => {
    await qt.outl(CONFIG_ADDRESS, a);
    await qt.outw(CONFIG_DATA + (off & 2), value);
  });
}

export function cfgWrite32(qt: Qtest, b: number, off: number, value: number): Promise<void> {
  const a = cfgAddress(b, off, 4);
  return locked(qt, async () => {
    await qt.outl(CONFIG_ADDRESS, a);
    await qt.outl(CONFIG_DATA, value >>> 0);
  });
}

export interface PciFunctionInfo {
  bdf: number;
  vendor: number;
  device: number;
  /** Class code (base, sub, prog-if) as 24 bits. */
  classCode: number;
  revision: number;
  headerType: number;
}

/** Every function present on `bus` (vendor ID not 0xffff). */
export async function listDevices(qt: Qtest, bus = 0): Promise<PciFunctionInfo[]> {
  const found: PciFunctionInfo[] = [];
  for (let dev = 0; dev < 32; dev++) {
    for (let fn = 0; fn < 8; fn++) {
      const b = bdf(bus, dev, fn);
      const id = await cfgRead32(qt, b, PCI_VENDOR_ID);
      const vendor = id & 0xffff;
      if (vendor === 0xffff || vendor === 0) {
        if (fn === 0) break; // no device in this slot
        continue;
      }
      const cr = await cfgRead32(qt, b, PCI_CLASS_REVISION);
      const headerType = await cfgRead8(qt, b, PCI_HEADER_TYPE);
      found.push({ bdf: b, vendor, device: id >>> 16, classCode: cr >>> 8, revision: cr & 0xff, headerType });
      if (fn === 0 && (headerType & 0x80) === 0) break; // single-function device
    }
  }
  return found;
}

/** The bdf of the first function on `bus` with these IDs, or null. */
export async function findDevice(qt: Qtest, vendor: number, device: number, bus = 0): Promise<number | null> {
  for (const f of await listDevices(qt, bus)) {
    if (f.vendor === vendor && f.device === device) return f.bdf;
  }
  return null;
}

/** Offset of the first capability with ID `capId` in the standard list, or null. */
export async function findCapability(qt: Qtest, b: number, capId: number): Promise<number | null> {
  const status = await cfgRead16(qt, b, PCI_STATUS);
  if ((status & PCI_STATUS_CAP_LIST) === 0) return null;
  let ptr = (await cfgRead8(qt, b, PCI_CAPABILITY_LIST)) & 0xfc;
  for (let hops = 0; ptr !== 0 && hops < 48; hops++) {
    const hdr = await cfgRead16(qt, b, ptr);
    if ((hdr & 0xff) === capId) return ptr;
    ptr = (hdr >> 8) & 0xfc;
  }
  return null;
}

export interface BarInfo {
  kind: "io" | "mem32" | "mem64";
  prefetchable: boolean;
  /** Current base address (flag bits stripped). */
  address: bigint;
}

function barOffset(i: number): number {
  if (!Number.isInteger(i) || i < 0 || i > 5) throw new RangeError(`pci: BAR index ${i} (0-5 only)`);
  return PCI_BAR0 + 4 * i;
}

/** Type and current address of BAR `i` (for a 64-bit BAR, `i` is its low half). */
export async function readBar(qt: Qtest, b: number, i: number): Promise<BarInfo> {
  const off = barOffset(i);
  const lo = await cfgRead32(qt, b, off);
  if (lo & 1) return { kind: "io", prefetchable: false, address: BigInt(lo & 0xffff_fffc) };
  const prefetchable = (lo & 8) !== 0;
  if (((lo >> 1) & 3) === 2) {
    if (i === 5) throw new Error(`pci: ${formatBdf(b)} BAR5 claims to be 64-bit`);
    const hi = await cfgRead32(qt, b, off + 4);
    return { kind: "mem64", prefetchable, address: (BigInt(hi >>> 0) << 32n) | BigInt((lo & 0xffff_fff0) >>> 0) };
  }
  return { kind: "mem32", prefetchable, address: BigInt((lo & 0xffff_fff0) >>> 0) };
}

/**
 * Size of BAR `i` by the write-all-ones protocol; 0n if the BAR is not
 * implemented. Memory and I/O decoding are off while sizing; the BAR and the
 * command register are restored afterwards.
 */
export async function barSize(qt: Qtest, b: number, i: number): Promise<bigint> {
  const off = barOffset(i);
  const cmd = await cfgRead16(qt, b, PCI_COMMAND);
  if (cmd & (PCI_COMMAND_MEMORY | PCI_COMMAND_IO)) {
    await cfgWrite16(qt, b, PCI_COMMAND, cmd & ~(PCI_COMMAND_MEMORY | PCI_COMMAND_IO));
  }
  try {
    const lo = await cfgRead32(qt, b, off);
    await cfgWrite32(qt, b, off, 0xffff_ffff);
    const loMask = await cfgRead32(qt, b, off);
    await cfgWrite32(qt, b, off, lo);
    if (loMask === 0) return 0n;
    if (lo & 1) {
      const m = BigInt((loMask & 0xffff_fffc) >>> 0);
      return m & -m;
    }
    let mask = BigInt((loMask & 0xffff_fff0) >>> 0);
    if (((lo >> 1) & 3) === 2 && i < 5) {
      const hi = await cfgRead32(qt, b, off + 4);
      await cfgWrite32(qt, b, off + 4, 0xffff_ffff);
      const hiMask = await cfgRead32(qt, b, off + 4);
      await cfgWrite32(qt, b, off + 4, hi);
      mask |= BigInt(hiMask >>> 0) << 32n;
    }
    return mask & -mask;
  } finally {
    if (cmd & (PCI_COMMAND_MEMORY | PCI_COMMAND_IO)) await cfgWrite16(qt, b, PCI_COMMAND, cmd);
  }
}

/**
 * Program BAR `i` with `address` (low half first, then the high half for a
 * 64-bit BAR). The caller picks an address aligned to the BAR's size (see
 * `barSize`, `BarAllocator`); decoding is enabled separately (`enableDevice`).
 */
export async function assignBar(qt: Qtest, b: number, i: number, address: bigint): Promise<void> {
  const off = barOffset(i);
  const lo = await cfgRead32(qt, b, off);
  if (lo & 1) {
    if (address < 0n || address > 0xfffcn || (address & 3n) !== 0n) throw new RangeError(`pci: I/O BAR address 0x${address.toString(16)} invalid`);
    await cfgWrite32(qt, b, off, Number(address));
    return;
  }
  if (address < 0n || (address & 0xfn) !== 0n) throw new RangeError(`pci: BAR address 0x${address.toString(16)} is not 16-byte aligned`);
  const is64 = ((lo >> 1) & 3) === 2;
  if (!is64 && address > 0xffff_ffffn) {
    throw new RangeError(`pci: ${formatBdf(b)} BAR${i} is 32-bit; 0x${address.toString(16)} is above 4 GiB`);
  }
  await cfgWrite32(qt, b, off, Number(address & 0xffff_fff0n));
  if (is64) {
    if (i === 5) throw new Error(`pci: ${formatBdf(b)} BAR5 claims to be 64-bit`);
    await cfgWrite32(qt, b, off + 4, Number((address >> 32n) & 0xffff_ffffn));
  }
}

export interface EnableOptions {
  memory?: boolean;
  io?: boolean;
  busMaster?: boolean;
  intxDisable?: boolean;
}

/**
 * Set (true) or clear (false) command register bits; omitted ones are kept.
 * A 16-bit write, so the status register is not touched. Returns the new
 * command value.
 */
export async function enableDevice(qt: Qtest, b: number, opts: EnableOptions = { memory: true, busMaster: true }): Promise<number> {
  let cmd = await cfgRead16(qt, b, PCI_COMMAND);
  const apply = (on: boolean | undefined, bit: number) => {
    if (on === true) cmd |= bit;
    else if (on === false) cmd &= ~bit;
  };
  apply(opts.memory, PCI_COMMAND_MEMORY);
  apply(opts.io, PCI_COMMAND_IO);
  apply(opts.busMaster, PCI_COMMAND_MASTER);
  apply(opts.intxDisable, PCI_COMMAND_INTX_DISABLE);
  await cfgWrite16(qt, b, PCI_COMMAND, cmd & 0xffff);
  return cmd & 0xffff;
}

/**
 * Hands out naturally aligned BAR addresses from the two windows. Use one
 * allocator per machine so BARs of different devices never overlap.
 */
export class BarAllocator {
  private next32: bigint;
  private next64: bigint;
  constructor(
    private readonly window32: { base: bigint; end: bigint } = { base: PCI_MMIO32_BASE, end: PCI_MMIO32_END },
    private readonly window64: { base: bigint; end: bigint } = { base: PCI_MMIO64_BASE, end: PCI_MMIO64_END },
  ) {
    this.next32 = window32.base;
    this.next64 = window64.base;
  }

  /** An address below 4 GiB (at least page-aligned). */
  alloc32(size: bigint): bigint {
    const a = place(this.next32, size, this.window32.end);
    this.next32 = a + size;
    return a;
  }

  /** An address above 4 GiB, for 64-bit BARs. */
  alloc64(size: bigint): bigint {
    const a = place(this.next64, size, this.window64.end);
    this.next64 = a + size;
    return a;
  }
}

function place(next: bigint, size: bigint, end: bigint): bigint {
  if (size <= 0n || (size & (size - 1n)) !== 0n) throw new RangeError(`pci: BAR size 0x${size.toString(16)} is not a power of two`);
  const align = size < 0x1000n ? 0x1000n : size;
  const addr = (next + align - 1n) & ~(align - 1n);
  if (addr + size > end) throw new RangeError(`pci: no room for 0x${size.toString(16)} bytes below 0x${end.toString(16)}`);
  return addr;
}

export interface AssignedBar {
  address: bigint;
  size: bigint;
  kind: BarInfo["kind"];
  prefetchable: boolean;
}

/**
 * Size every memory BAR of `b`, place it (64-bit BARs above 4 GiB unless
 * `below4g`), and return what was assigned by BAR index. I/O BARs are left
 * alone. Does not enable decoding (see `enableDevice`).
 */
export async function assignAllBars(
  qt: Qtest,
  b: number,
  alloc: BarAllocator,
  opts: { below4g?: boolean } = {},
): Promise<Map<number, AssignedBar>> {
  const out = new Map<number, AssignedBar>();
  for (let i = 0; i < 6; i++) {
    const info = await readBar(qt, b, i);
    const size = await barSize(qt, b, i);
    if (size > 0n && info.kind !== "io") {
      const address = info.kind === "mem64" && !opts.below4g ? alloc.alloc64(size) : alloc.alloc32(size);
      await assignBar(qt, b, i, address);
      out.set(i, { address, size, kind: info.kind, prefetchable: info.prefetchable });
    }
    if (info.kind === "mem64") i++; // the high half is not a BAR of its own
  }
  return out;
}

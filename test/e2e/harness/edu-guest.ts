/**
 * The guest driver's side of the edu device (QEMU's docs/specs/edu.rst),
 * played over qtest: register map, bring-up, factorial, DMA, MSI. Shared by
 * the end-to-end tests and docker/demo-qemu.ts; no vitest here.
 */
import type { Qtest } from "./qtest.ts";
import * as pci from "./pci.ts";

export const EDU_VENDOR = 0x1234;
export const EDU_DEVICE = 0x11e8;
/** QEMU's edu: PCI_CLASS_OTHERS (0xff) subclass 0, prog-if 0; revision 0x10. */
export const EDU_CLASS = 0x00ff00;
export const EDU_REVISION = 0x10;
export const BAR0_SIZE = 0x100000n;
export const PCI_CAP_ID_MSI = 0x05;

export const REG = {
  ID: 0x00,
  LIVENESS: 0x04,
  FACTORIAL: 0x08,
  STATUS: 0x20,
  IRQ_STATUS: 0x24,
  IRQ_RAISE: 0x60,
  IRQ_ACK: 0x64,
  DMA_SRC: 0x80,
  DMA_DST: 0x88,
  DMA_COUNT: 0x90,
  DMA_CMD: 0x98,
} as const;

/** Deterministic pseudo-random bytes (xorshift32). */
export function pattern(len: number, seed: number): Buffer {
  const b = Buffer.alloc(len);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < len; i++) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    b[i] = x & 0xff;
  }
  return b;
}

/**
 * Call `read` until `done(value)` or `timeoutMs`; returns the last value and
 * how many reads it took. The default deadline (30 s) is for things that must
 * happen: it only costs time when they do not, and a loaded machine can take
 * seconds. A wait for something that must *not* happen passes its own, short one.
 */
export async function pollUntil<T>(what: string, read: () => Promise<T>, done: (v: T) => boolean, timeoutMs = 30_000): Promise<{ value: T; reads: number }> {
  const t0 = performance.now();
  let reads = 0;
  for (;;) {
    const value = await read();
    reads++;
    if (done(value)) return { value, reads };
    if (performance.now() - t0 > timeoutMs) {
      throw new Error(`timed out after ${timeoutMs} ms (${reads} reads) waiting for ${what}; last value ${hex(value)}`);
    }
    if (reads > 50) await new Promise((r) => setTimeout(r, 1));
  }
}

/** Numbers as 0x…, anything else as String(). */
export function hex(v: unknown): string {
  if (typeof v === "number") return "0x" + (v >>> 0).toString(16);
  if (typeof v === "bigint") return "0x" + v.toString(16);
  return String(v);
}

/** The guest driver's view of one edu function. */
export class EduGuest {
  constructor(
    readonly qt: Qtest,
    readonly bdf: number,
    readonly bar0: bigint,
  ) {}
  read(reg: number): Promise<number> {
    return this.qt.readl(this.bar0 + BigInt(reg));
  }
  write(reg: number, value: number): Promise<void> {
    return this.qt.writel(this.bar0 + BigInt(reg), value >>> 0);
  }
  async factorial(n: number): Promise<number> {
    await this.write(REG.FACTORIAL, n);
    await pollUntil("factorial (status bit 0 clear)", () => this.read(REG.STATUS), (s) => (s & 1) === 0);
    return this.read(REG.FACTORIAL);
  }
  /** Program a DMA transfer and wait for cmd bit 0 to clear. */
  async dma(src: bigint, dst: bigint, count: number, cmd: number): Promise<void> {
    await this.write(REG.DMA_SRC, Number(src & 0xffff_ffffn));
    await this.write(REG.DMA_DST, Number(dst & 0xffff_ffffn));
    await this.write(REG.DMA_COUNT, count);
    await this.write(REG.DMA_CMD, cmd | 1);
    await pollUntil(`DMA 0x${src.toString(16)} -> 0x${dst.toString(16)} (cmd bit 0 clear)`, () => this.read(REG.DMA_CMD), (c) => (c & 1) === 0);
  }
}

export interface MsiCap {
  at: number;
  is64: boolean;
  dataOff: number;
}

export async function msiCapability(qt: Qtest, b: number): Promise<MsiCap> {
  const at = await pci.findCapability(qt, b, PCI_CAP_ID_MSI);
  if (at === null) throw new Error(`no MSI capability on ${pci.formatBdf(b)}`);
  const ctrl = await pci.cfgRead16(qt, b, at + 2);
  const is64 = (ctrl & 0x80) !== 0;
  return { at, is64, dataOff: at + (is64 ? 12 : 8) };
}

export async function programMsi(qt: Qtest, b: number, cap: MsiCap, addr: bigint, data: number): Promise<void> {
  await pci.cfgWrite32(qt, b, cap.at + 4, Number(addr & 0xffff_ffffn));
  if (cap.is64) await pci.cfgWrite32(qt, b, cap.at + 8, Number(addr >> 32n));
  await pci.cfgWrite16(qt, b, cap.dataOff, data);
}

export async function setMsiEnabled(qt: Qtest, b: number, cap: MsiCap, on: boolean): Promise<void> {
  const ctrl = await pci.cfgRead16(qt, b, cap.at + 2);
  await pci.cfgWrite16(qt, b, cap.at + 2, on ? ctrl | 1 : ctrl & ~1 & ~0x70);
}

/** Size BAR0, place it in the 32-bit window (or at `at`), enable memory + bus master. */
export async function bringUp(qt: Qtest, b: number, alloc: pci.BarAllocator, at?: bigint): Promise<bigint> {
  const size = await pci.barSize(qt, b, 0);
  if (size !== BAR0_SIZE) throw new Error(`BAR0 of ${pci.formatBdf(b)} is 0x${size.toString(16)} bytes, expected 1 MiB`);
  const addr = at ?? alloc.alloc32(size);
  await pci.assignBar(qt, b, 0, addr);
  await pci.enableDevice(qt, b, { memory: true, busMaster: true });
  return addr;
}

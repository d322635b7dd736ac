/**
 * The guest driver's side of `bigmem` (devices/bigmem/bigmem.ts) over
 * qtest: bring-up (BAR0 registers below 4 GiB, BAR2 memory in the 64-bit
 * window), device-memory access through BAR2, the DMA engine between device
 * memory and guest RAM, and the checksum engine. No vitest here.
 */
import { BIGMEM_DEVICE_ID, BigmemReg, CMD_START, DMA_TO_GUEST, STATUS_CSUM_ERROR, STATUS_DMA_ERROR } from "../../../devices/bigmem/bigmem.ts";
import { pollUntil } from "./edu-guest.ts";
import type { Qtest } from "./qtest.ts";
import * as pci from "./pci.ts";

export const BIGMEM_VENDOR = 0x1234;
export { BIGMEM_DEVICE_ID };

export class BigmemGuest {
  constructor(
    readonly qt: Qtest,
    readonly bdf: number,
    /** Guest-physical address of BAR0 (registers). */
    readonly bar0: bigint,
    /** Guest-physical address of BAR2 (device memory). */
    readonly bar2: bigint,
  ) {}

  /** Sizes and places both BARs (or at the given addresses) and enables memory + bus master. */
  static async bringUp(qt: Qtest, b: number, at?: { bar0: bigint; bar2: bigint }): Promise<BigmemGuest> {
    const alloc = new pci.BarAllocator();
    const size0 = await pci.barSize(qt, b, 0);
    const size2 = await pci.barSize(qt, b, 2);
    const bar0 = at?.bar0 ?? alloc.alloc32(size0);
    const bar2 = at?.bar2 ?? alloc.alloc64(size2);
    await pci.assignBar(qt, b, 0, bar0);
    await pci.assignBar(qt, b, 2, bar2);
    await pci.enableDevice(qt, b, { memory: true, busMaster: true });
    return new BigmemGuest(qt, b, bar0, bar2);
  }

  read(reg: number): Promise<number> {
    return this.qt.readl(this.bar0 + BigInt(reg));
  }
  write(reg: number, value: number): Promise<void> {
    return this.qt.writel(this.bar0 + BigInt(reg), value >>> 0);
  }
  async write64(reg: number, value: bigint): Promise<void> {
    await this.write(reg, Number(value & 0xffff_ffffn));
    await this.write(reg + 4, Number(value >> 32n));
  }

  /** Device memory through BAR2. */
  memRead(offset: bigint, length: number): Promise<Buffer> {
    return this.qt.read(this.bar2 + offset, length);
  }
  memWrite(offset: bigint, data: Buffer): Promise<void> {
    return this.qt.write(this.bar2 + offset, data);
  }
  memReadl(offset: bigint): Promise<number> {
    return this.qt.readl(this.bar2 + offset);
  }
  memWritel(offset: bigint, value: number): Promise<void> {
    return this.qt.writel(this.bar2 + offset, value >>> 0);
  }

  /** Starts a DMA without waiting (the engine runs after the write is answered). */
  async startDma(guest: bigint, offset: bigint, length: bigint, toGuest: boolean): Promise<void> {
    await this.write64(BigmemReg.DMA_GUEST, guest);
    await this.write64(BigmemReg.DMA_OFFSET, offset);
    await this.write64(BigmemReg.DMA_LENGTH, length);
    await this.write(BigmemReg.DMA_CMD, CMD_START | (toGuest ? DMA_TO_GUEST : 0));
  }

  /** Waits for the DMA engine (cmd bit 0 clear); throws if it reported an error. */
  async waitDma(timeoutMs = 30_000): Promise<void> {
    await pollUntil("bigmem DMA done", () => this.read(BigmemReg.DMA_CMD), (c) => (c & CMD_START) === 0, timeoutMs);
    const status = await this.read(BigmemReg.STATUS);
    if (status & STATUS_DMA_ERROR) throw new Error(`bigmem DMA failed (STATUS 0x${status.toString(16)})`);
  }

  async dma(guest: bigint, offset: bigint, length: bigint, toGuest: boolean, timeoutMs?: number): Promise<void> {
    await this.startDma(guest, offset, length, toGuest);
    await this.waitDma(timeoutMs);
  }

  /** FNV-1a of device memory [offset, offset + length), computed by the device. */
  async checksum(offset: bigint, length: bigint, timeoutMs = 60_000): Promise<number> {
    await this.write64(BigmemReg.CSUM_OFFSET, offset);
    await this.write64(BigmemReg.CSUM_LENGTH, length);
    await this.write(BigmemReg.CSUM_CMD, CMD_START);
    await pollUntil("bigmem checksum done", () => this.read(BigmemReg.CSUM_CMD), (c) => (c & CMD_START) === 0, timeoutMs);
    const status = await this.read(BigmemReg.STATUS);
    if (status & STATUS_CSUM_ERROR) throw new Error(`bigmem checksum failed (STATUS 0x${status.toString(16)})`);
    return this.read(BigmemReg.CSUM_RESULT);
  }
}

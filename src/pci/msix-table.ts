/**
 * The MSI-X table and Pending Bit Array a function serves inside its BARs
 * (spec: PCI 3.0, 6.8.2). Table entries are 16 bytes: address low, address
 * high, data, vector control (bit 0 = mask). Every vector is masked at reset.
 * The PBA is read-only to the guest; the interrupt layer (src/irq/interrupts.ts)
 * sets a vector's pending bit when it fires while the client has it masked
 * (no eventfd) and clears it when the held message goes out. The table's own
 * mask bits are the guest's view for clients that do not emulate the table;
 * QEMU does, so delivery never depends on them.
 */
import { PciMsix } from "./registers.ts";

export interface MsixEntry {
  address: bigint;
  data: number;
  /** The vector's own mask bit (the function mask lives in the capability). */
  masked: boolean;
}

/** Guest-writable bits of each entry byte. */
const ENTRY_WMASK = new Uint8Array(PciMsix.ENTRY_SIZE);
// Address bits 1:0 are reserved for dword alignment.
ENTRY_WMASK.fill(0xff, PciMsix.ENTRY_LOWER_ADDR, PciMsix.ENTRY_VECTOR_CTRL);
ENTRY_WMASK[PciMsix.ENTRY_LOWER_ADDR] = 0xfc;
// Vector control: only the mask bit is defined.
ENTRY_WMASK[PciMsix.ENTRY_VECTOR_CTRL] = PciMsix.ENTRY_CTRL_MASKBIT;

export class MsixTable {
  readonly vectors: number;
  /** Table length in bytes. */
  readonly tableSize: number;
  /** PBA length in bytes: one bit per vector, in whole qwords. */
  readonly pbaSize: number;
  private readonly table: Buffer;
  private readonly pba: Buffer;

  constructor(vectors: number) {
    if (!Number.isInteger(vectors) || vectors < 1 || vectors > PciMsix.MAX_VECTORS) {
      throw new RangeError(`MSI-X vectors must be 1..${PciMsix.MAX_VECTORS}, got ${vectors}`);
    }
    this.vectors = vectors;
    this.tableSize = vectors * PciMsix.ENTRY_SIZE;
    this.pbaSize = Math.ceil(vectors / 64) * 8;
    this.table = Buffer.alloc(this.tableSize);
    this.pba = Buffer.alloc(this.pbaSize);
    this.reset();
  }

  readTable(offset: number, length: number): Buffer {
    checkRange("table", offset, length, this.tableSize);
    return Buffer.from(this.table.subarray(offset, offset + length));
  }

  /** A guest write into the table; returns the vectors whose entry changed. */
  writeTable(offset: number, data: Uint8Array): number[] {
    checkRange("table", offset, data.length, this.tableSize);
    const changed: number[] = [];
    for (let i = 0; i < data.length; i++) {
      const o = offset + i;
      const wm = ENTRY_WMASK[o % PciMsix.ENTRY_SIZE]!;
      const v = (this.table[o]! & ~wm) | (data[i]! & wm);
      if (v === this.table[o]) continue;
      this.table[o] = v;
      const vector = Math.floor(o / PciMsix.ENTRY_SIZE);
      if (changed[changed.length - 1] !== vector) changed.push(vector);
    }
    return changed;
  }

  readPba(offset: number, length: number): Buffer {
    checkRange("PBA", offset, length, this.pbaSize);
    return Buffer.from(this.pba.subarray(offset, offset + length));
  }

  entry(vector: number): MsixEntry {
    this.checkVector(vector);
    const at = vector * PciMsix.ENTRY_SIZE;
    const lo = this.table.readUInt32LE(at + PciMsix.ENTRY_LOWER_ADDR);
    const hi = this.table.readUInt32LE(at + PciMsix.ENTRY_UPPER_ADDR);
    return {
      address: (BigInt(hi) << 32n) | BigInt(lo),
      data: this.table.readUInt32LE(at + PciMsix.ENTRY_DATA),
      masked: (this.table[at + PciMsix.ENTRY_VECTOR_CTRL]! & PciMsix.ENTRY_CTRL_MASKBIT) !== 0,
    };
  }

  setPending(vector: number, on: boolean): void {
    this.checkVector(vector);
    const byte = vector >> 3;
    const bit = 1 << (vector & 7);
    this.pba[byte] = on ? this.pba[byte]! | bit : this.pba[byte]! & ~bit;
  }

  isPending(vector: number): boolean {
    this.checkVector(vector);
    return (this.pba[vector >> 3]! & (1 << (vector & 7))) !== 0;
  }

  /** All entries zero and masked, nothing pending (spec: PCI 3.0, 6.8.2.9). */
  reset(): void {
    this.table.fill(0);
    this.pba.fill(0);
    for (let v = 0; v < this.vectors; v++) {
      this.table[v * PciMsix.ENTRY_SIZE + PciMsix.ENTRY_VECTOR_CTRL] = PciMsix.ENTRY_CTRL_MASKBIT;
    }
  }

  /** Table bytes followed by PBA bytes. */
  snapshot(): Uint8Array {
    const out = new Uint8Array(this.tableSize + this.pbaSize);
    out.set(this.table, 0);
    out.set(this.pba, this.tableSize);
    return out;
  }

  restore(bytes: Uint8Array): void {
    if (bytes.length !== this.tableSize + this.pbaSize) {
      throw new Error(
        `MSI-X snapshot is ${bytes.length} bytes, expected ${this.tableSize + this.pbaSize} for ${this.vectors} vectors`,
      );
    }
    for (let o = 0; o < this.tableSize; o++) {
      const reserved = ~ENTRY_WMASK[o % PciMsix.ENTRY_SIZE]! & 0xff;
      if ((bytes[o]! & reserved) !== 0) throw new Error(`MSI-X snapshot sets reserved bits at table offset ${o}`);
    }
    const pba = bytes.subarray(this.tableSize);
    // Bits past the last vector do not exist.
    for (let v = this.vectors; v < this.pbaSize * 8; v++) {
      if ((pba[v >> 3]! & (1 << (v & 7))) !== 0) throw new Error(`MSI-X snapshot has pending bit ${v} past the table`);
    }
    this.table.set(bytes.subarray(0, this.tableSize));
    this.pba.set(pba);
  }

  private checkVector(vector: number): void {
    if (!Number.isInteger(vector) || vector < 0 || vector >= this.vectors) {
      throw new RangeError(`MSI-X vector ${vector} out of range 0..${this.vectors - 1}`);
    }
  }
}

function checkRange(what: string, offset: number, length: number, size: number): void {
  if (!Number.isInteger(offset) || !Number.isInteger(length) || offset < 0 || length < 0 || offset + length > size) {
    throw new RangeError(`MSI-X ${what} access out of range: offset ${offset} length ${length} (size ${size})`);
  }
}

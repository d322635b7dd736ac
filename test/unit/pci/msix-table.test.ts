import { describe, expect, it } from "vitest";
import { MsixTable } from "../../../src/pci/msix-table.ts";

function entryBytes(addr: bigint, data: number, ctrl: number): Buffer {
  const b = Buffer.alloc(16);
  b.writeBigUInt64LE(addr, 0);
  b.writeUInt32LE(data, 8);
  b.writeUInt32LE(ctrl, 12);
  return b;
}

describe("MsixTable", () => {
  it("starts with every vector masked and nothing pending", () => {
    const t = new MsixTable(3);
    expect(t.tableSize).toBe(48);
    expect(t.pbaSize).toBe(8);
    for (let v = 0; v < 3; v++) expect(t.entry(v)).toEqual({ address: 0n, data: 0, masked: true });
    expect(t.readTable(12, 4).readUInt32LE(0)).toBe(1);
    expect(t.readPba(0, 8).equals(Buffer.alloc(8))).toBe(true);
  });

  it("sizes the PBA in qwords", () => {
    expect(new MsixTable(64).pbaSize).toBe(8);
    expect(new MsixTable(65).pbaSize).toBe(16);
    expect(new MsixTable(2048).pbaSize).toBe(256);
    expect(() => new MsixTable(0)).toThrow(RangeError);
    expect(() => new MsixTable(2049)).toThrow(RangeError);
  });

  it("decodes entries and reports the vectors a write changed", () => {
    const t = new MsixTable(4);
    expect(t.writeTable(16, entryBytes(0x1_fee0_0000n, 0x4041, 0))).toEqual([1]);
    expect(t.entry(1)).toEqual({ address: 0x1_fee0_0000n, data: 0x4041, masked: false });
    // Same bytes again: nothing changed.
    expect(t.writeTable(16, entryBytes(0x1_fee0_0000n, 0x4041, 0))).toEqual([]);
    // A write spanning entries 2 and 3 (dword writes are the norm, but bytes are fine).
    // Vector 2's control is already masked, so only its data counts as a change.
    expect(t.writeTable(44, Buffer.alloc(4, 0xff))).toEqual([]);
    const span = Buffer.alloc(12, 0xff);
    expect(t.writeTable(40, span)).toEqual([2, 3]);
    expect(t.entry(2).masked).toBe(true);
    expect(t.entry(2).data).toBe(0xffff_ffff);
    expect(t.entry(3).address & 0xffff_ffffn).toBe(0xffff_fffcn);
  });

  it("keeps reserved bits read-only: address bits 1:0 and vector control above bit 0", () => {
    const t = new MsixTable(1);
    t.writeTable(0, entryBytes(0xfee0_0003n, 1, 0xffff_fffe));
    expect(t.readTable(0, 4).readUInt32LE(0)).toBe(0xfee0_0000);
    expect(t.readTable(12, 4).readUInt32LE(0)).toBe(0);
    expect(t.entry(0).masked).toBe(false);
    t.writeTable(12, Uint8Array.of(1));
    expect(t.entry(0).masked).toBe(true);
  });

  it("sets and clears pending bits for the device; the PBA reads them", () => {
    const t = new MsixTable(70);
    t.setPending(0, true);
    t.setPending(9, true);
    t.setPending(69, true);
    expect(t.readPba(0, 8).readBigUInt64LE(0)).toBe((1n << 0n) | (1n << 9n));
    expect(t.readPba(8, 8).readBigUInt64LE(0)).toBe(1n << 5n);
    expect(t.isPending(9)).toBe(true);
    t.setPending(9, false);
    expect(t.isPending(9)).toBe(false);
    expect(() => t.setPending(70, true)).toThrow(RangeError);
    expect(() => t.entry(-1)).toThrow(RangeError);
  });

  it("refuses accesses out of range", () => {
    const t = new MsixTable(2);
    expect(() => t.readTable(28, 8)).toThrow(RangeError);
    expect(() => t.writeTable(32, Uint8Array.of(0))).toThrow(RangeError);
    expect(() => t.readPba(4, 8)).toThrow(RangeError);
  });

  it("resets to masked and not pending", () => {
    const t = new MsixTable(2);
    t.writeTable(0, entryBytes(0xfee0_0000n, 5, 0));
    t.setPending(1, true);
    t.reset();
    expect(t.entry(0)).toEqual({ address: 0n, data: 0, masked: true });
    expect(t.isPending(1)).toBe(false);
  });

  it("round-trips a snapshot and refuses a mismatched one", () => {
    const a = new MsixTable(3);
    a.writeTable(32, entryBytes(0xfee0_1000n, 0x21, 0));
    a.setPending(1, true);
    const snap = a.snapshot();
    expect(snap.length).toBe(48 + 8);
    const b = new MsixTable(3);
    b.restore(snap);
    expect(b.readTable(0, 48).equals(a.readTable(0, 48))).toBe(true);
    expect(b.isPending(1)).toBe(true);
    expect(b.entry(2)).toEqual({ address: 0xfee0_1000n, data: 0x21, masked: false });

    expect(() => new MsixTable(4).restore(snap)).toThrow(/bytes/);
    const badPba = snap.slice();
    badPba[48] = 0x08; // vector 3 does not exist
    expect(() => b.restore(badPba)).toThrow(/past the table/);
    const badEntry = snap.slice();
    badEntry[12] = 0x02;
    expect(() => b.restore(badEntry)).toThrow(/reserved/);
  });
});

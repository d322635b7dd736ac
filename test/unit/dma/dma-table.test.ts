import { describe, expect, it } from "vitest";
import { Errno } from "../../../protocol/constants.ts";
import { VfioUserError } from "../../../protocol/errors.ts";
import { U64_MAX } from "../../../protocol/u64.ts";
import { DmaEngine } from "../../../src/dma/dma-engine.ts";
import { DmaTable, type MemoryWindow } from "../../../src/dma/dma-table.ts";

function errnoOf(fn: () => unknown): number | undefined {
  try {
    fn();
  } catch (err) {
    return (err as VfioUserError).errno;
  }
  return undefined;
}

function bufferWindow(size: number): MemoryWindow & { buf: Buffer; unmapped: boolean } {
  const w = {
    buf: Buffer.alloc(size),
    unmapped: false,
    read: (o: bigint, n: number) => Buffer.from(w.buf.subarray(Number(o), Number(o) + n)),
    write: (o: bigint, d: Uint8Array) => void w.buf.set(d, Number(o)),
    unmap: () => void (w.unmapped = true),
  };
  return w;
}

const region = (iova: bigint, size: bigint, memory: MemoryWindow | null = null) => ({ iova, size, offset: 0n, readable: true, writable: true, memory });

describe("DmaTable", () => {
  it("refuses overlap with EEXIST, touching regions are fine", () => {
    const t = new DmaTable(10);
    t.add(region(0x1000n, 0x1000n));
    expect(errnoOf(() => t.add(region(0x1800n, 0x1000n)))).toBe(Errno.EEXIST);
    expect(errnoOf(() => t.add(region(0x0n, 0x1001n)))).toBe(Errno.EEXIST);
    t.add(region(0x2000n, 0x1000n));
    t.add(region(0x0n, 0x1000n));
    expect(t.regions().map((r) => r.iova)).toEqual([0x0n, 0x1000n, 0x2000n]);
  });

  it("refuses size 0 and wrap past 2^64 with EINVAL, and too many maps with ENOSPC", () => {
    const t = new DmaTable(1);
    expect(errnoOf(() => t.add(region(0n, 0n)))).toBe(Errno.EINVAL);
    expect(errnoOf(() => t.add(region(U64_MAX, 2n)))).toBe(Errno.EINVAL);
    t.add(region(U64_MAX, 1n)); // the very last byte is a valid region
    expect(errnoOf(() => t.add(region(0n, 1n)))).toBe(Errno.ENOSPC);
  });

  it("unmaps only an exact match (ENOENT otherwise) and releases the mapping", () => {
    const t = new DmaTable(10);
    const w = bufferWindow(0x1000);
    t.add(region(0x1000n, 0x1000n, w));
    expect(errnoOf(() => t.remove(0x1000n, 0x800n))).toBe(Errno.ENOENT);
    expect(w.unmapped).toBe(false);
    t.remove(0x1000n, 0x1000n);
    expect(w.unmapped).toBe(true);
    expect(t.count).toBe(0);
  });

  it("looks up a range inside one region; EFAULT for gaps and straddles", () => {
    const t = new DmaTable(10);
    t.add(region(0x1000n, 0x1000n));
    t.add(region(0x2000n, 0x1000n));
    expect(t.lookup(0x1ff0n, 0x10n).iova).toBe(0x1000n);
    expect(t.lookup(0x2000n, 0x1000n).iova).toBe(0x2000n);
    expect(errnoOf(() => t.lookup(0x1ff0n, 0x20n))).toBe(Errno.EFAULT);
    expect(errnoOf(() => t.lookup(0x3000n, 1n))).toBe(Errno.EFAULT);
    expect(errnoOf(() => t.lookup(0x0n, 1n))).toBe(Errno.EFAULT);
  });
});

describe("DmaEngine", () => {
  it("writes through mapped memory and through the socket, logging both as dirty", async () => {
    const t = new DmaTable(10);
    const w = bufferWindow(0x2000);
    t.add(region(0x10000n, 0x2000n, w));
    t.add(region(0x20000n, 0x1000n));
    const socketWrites: Array<[bigint, number]> = [];
    const dirty: Array<[bigint, bigint]> = [];
    const e = new DmaEngine(() => t, () => true);
    e.socket = {
      dmaRead: async (_a, n) => Buffer.alloc(n, 7),
      dmaWrite: async (a, d) => void socketWrites.push([a, d.length]),
    };
    e.dirty = { markDirty: (a, n) => void dirty.push([a, n]) };
    await e.write(0x10ff0n, Buffer.from([1, 2, 3]));
    await e.write(0x20010n, Buffer.alloc(5));
    expect(w.buf.subarray(0xff0, 0xff3)).toEqual(Buffer.from([1, 2, 3]));
    expect(socketWrites).toEqual([[0x20010n, 5]]);
    expect(dirty).toEqual([[0x10ff0n, 3n], [0x20010n, 5n]]);
    expect(await e.read(0x20000n, 4)).toEqual(Buffer.alloc(4, 7));
    expect(await e.read(0x10ff0n, 3)).toEqual(Buffer.from([1, 2, 3]));
  });

  it("refuses DMA when bus mastering is off (EPERM), unmapped (EFAULT) or read-only (EPERM)", async () => {
    const t = new DmaTable(10);
    t.add({ iova: 0n, size: 0x1000n, offset: 0n, readable: true, writable: false, memory: bufferWindow(0x1000) });
    let master = false;
    const e = new DmaEngine(() => t, () => master);
    await expect(e.read(0n, 4)).rejects.toMatchObject({ errno: Errno.EPERM });
    master = true;
    await expect(e.write(0n, Buffer.alloc(4))).rejects.toMatchObject({ errno: Errno.EPERM });
    await expect(e.read(0x1000n, 1)).rejects.toMatchObject({ errno: Errno.EFAULT });
  });
});

/**
 * The DMA engine over adjacent DMA regions (fd-backed, fd-less and mixed),
 * scatter-gather reads and writes, zero-copy views with their pins, and
 * dirty logging per region.
 */
import fs from "node:fs";
import { afterEach, describe, expect, it } from "vitest";
import { Errno } from "../../../protocol/constants.ts";
import { DmaEngine, type SocketDma } from "../../../src/dma/dma-engine.ts";
import { DmaTable } from "../../../src/dma/dma-table.ts";
import { GuestWindow } from "../../../src/dma/guest-window.ts";
import { mapFd } from "../../../src/transport/mapping.ts";
import { native } from "../../../src/transport/native.ts";

const fds: number[] = [];
const windows: GuestWindow[] = [];

afterEach(() => {
  for (const w of windows.splice(0)) if (w.pinned === 0) w.unmap();
  for (const fd of fds.splice(0)) native.close(fd);
});

/** A memfd of `size` bytes mapped read-write (windows of `windowSize`). */
function memfdWindow(size: number, windowSize?: number): { fd: number; win: GuestWindow } {
  const fd = native.memfdCreate("dma-engine-test", BigInt(size));
  expect(fd).toBeGreaterThanOrEqual(0);
  fds.push(fd);
  const win = new GuestWindow(mapFd(fd, 0n, BigInt(size), true, windowSize));
  windows.push(win);
  return { fd, win };
}

function fdBytes(fd: number, offset: number, length: number): Buffer {
  const b = Buffer.alloc(length);
  fs.readSync(fd, b, 0, length, offset);
  return b;
}

/** Guest memory behind the socket (DMA_READ / DMA_WRITE), one flat buffer from `base`. */
function socketMemory(base: bigint, size: number): SocketDma & { buf: Buffer; calls: string[] } {
  const buf = Buffer.alloc(size);
  const calls: string[] = [];
  const at = (a: bigint, n: number) => {
    const o = Number(a - base);
    if (o < 0 || o + n > size) throw new Error(`socket DMA outside the fake's memory: ${a} +${n}`);
    return o;
  };
  return {
    buf,
    calls,
    dmaRead: async (a, n) => {
      calls.push(`read 0x${a.toString(16)} ${n}`);
      const o = at(a, n);
      return Buffer.from(buf.subarray(o, o + n));
    },
    dmaWrite: async (a, d) => {
      calls.push(`write 0x${a.toString(16)} ${d.length}`);
      buf.set(d, at(a, d.length));
    },
  };
}

const pattern = (n: number, seed = 1) => Buffer.from(Array.from({ length: n }, (_, i) => (i * 7 + seed) & 0xff));

function engine(table: DmaTable) {
  const dirty: Array<[bigint, bigint]> = [];
  const e = new DmaEngine(() => table, () => true);
  e.dirty = { markDirty: (a, n) => void dirty.push([a, n]) };
  return { e, dirty };
}

describe("DMA across adjacent DMA_MAP regions", () => {
  it("fd-backed + fd-backed: a write and a read straddling the edge are split, each part logged dirty on its own", async () => {
    const a = memfdWindow(0x1000);
    const b = memfdWindow(0x1000);
    const t = new DmaTable(8);
    t.add({ iova: 0x10000n, size: 0x1000n, offset: 0n, readable: true, writable: true, memory: a.win });
    t.add({ iova: 0x11000n, size: 0x1000n, offset: 0n, readable: true, writable: true, memory: b.win });
    const { e, dirty } = engine(t);
    const data = pattern(0x200);
    await e.write(0x10f00n, data);
    expect(fdBytes(a.fd, 0xf00, 0x100)).toEqual(data.subarray(0, 0x100));
    expect(fdBytes(b.fd, 0, 0x100)).toEqual(data.subarray(0x100));
    expect(dirty).toEqual([
      [0x10f00n, 0x100n],
      [0x11000n, 0x100n],
    ]);
    expect(await e.read(0x10f00n, 0x200)).toEqual(data);
  });

  it("fd-less + fd-less: each part goes as its own DMA_READ / DMA_WRITE", async () => {
    const t = new DmaTable(8);
    t.add({ iova: 0x20000n, size: 0x1000n, offset: 0n, readable: true, writable: true, memory: null });
    t.add({ iova: 0x21000n, size: 0x1000n, offset: 0n, readable: true, writable: true, memory: null });
    const { e, dirty } = engine(t);
    const sock = socketMemory(0x20000n, 0x2000);
    e.socket = sock;
    const data = pattern(0x20, 3);
    await e.write(0x20ff0n, data);
    expect(sock.calls).toEqual(["write 0x20ff0 16", "write 0x21000 16"]);
    expect(dirty).toEqual([
      [0x20ff0n, 0x10n],
      [0x21000n, 0x10n],
    ]);
    expect(await e.read(0x20ff0n, 0x20)).toEqual(data);
    expect(sock.calls.slice(2)).toEqual(["read 0x20ff0 16", "read 0x21000 16"]);
  });

  it("mixed fd-backed and fd-less regions, three of them in one access", async () => {
    const a = memfdWindow(0x1000);
    const c = memfdWindow(0x1000);
    const t = new DmaTable(8);
    t.add({ iova: 0x30000n, size: 0x1000n, offset: 0n, readable: true, writable: true, memory: a.win });
    t.add({ iova: 0x31000n, size: 0x1000n, offset: 0n, readable: true, writable: true, memory: null });
    t.add({ iova: 0x32000n, size: 0x1000n, offset: 0n, readable: true, writable: true, memory: c.win });
    const { e, dirty } = engine(t);
    const sock = socketMemory(0x31000n, 0x1000);
    e.socket = sock;
    const data = pattern(0x1100, 5);
    await e.write(0x30f80n, data);
    expect(fdBytes(a.fd, 0xf80, 0x80)).toEqual(data.subarray(0, 0x80));
    expect(sock.buf).toEqual(data.subarray(0x80, 0x1080));
    expect(fdBytes(c.fd, 0, 0x80)).toEqual(data.subarray(0x1080));
    expect(dirty).toEqual([
      [0x30f80n, 0x80n],
      [0x31000n, 0x1000n],
      [0x32000n, 0x80n],
    ]);
    expect(await e.read(0x30f80n, data.length)).toEqual(data);
  });

  it("a range with an unmapped gap fails with EFAULT before any byte is written", async () => {
    const a = memfdWindow(0x1000);
    const t = new DmaTable(8);
    t.add({ iova: 0x40000n, size: 0x1000n, offset: 0n, readable: true, writable: true, memory: a.win });
    t.add({ iova: 0x42000n, size: 0x1000n, offset: 0n, readable: true, writable: true, memory: null });
    const { e, dirty } = engine(t);
    e.socket = socketMemory(0x42000n, 0x1000);
    await expect(e.write(0x40ff0n, Buffer.alloc(0x20, 0xee))).rejects.toMatchObject({ errno: Errno.EFAULT });
    await expect(e.read(0x40ff0n, 0x20)).rejects.toMatchObject({ errno: Errno.EFAULT });
    await expect(e.writev([{ address: 0x40000n, length: 4 }, { address: 0x41000n, length: 4 }], Buffer.alloc(8, 0xee))).rejects.toMatchObject({ errno: Errno.EFAULT });
    expect(fdBytes(a.fd, 0, 0x1000)).toEqual(Buffer.alloc(0x1000));
    expect(dirty).toEqual([]);
  });

  it("a read-only region in the middle refuses a write with EPERM, and nothing moves", async () => {
    const a = memfdWindow(0x1000);
    const t = new DmaTable(8);
    t.add({ iova: 0x50000n, size: 0x1000n, offset: 0n, readable: true, writable: true, memory: a.win });
    t.add({ iova: 0x51000n, size: 0x1000n, offset: 0n, readable: true, writable: false, memory: null });
    const { e } = engine(t);
    e.socket = socketMemory(0x51000n, 0x1000);
    await expect(e.write(0x50ff0n, Buffer.alloc(0x20, 1))).rejects.toMatchObject({ errno: Errno.EPERM });
    expect(fdBytes(a.fd, 0xff0, 0x10)).toEqual(Buffer.alloc(0x10));
    expect(await e.read(0x50ff0n, 0x20)).toEqual(Buffer.alloc(0x20));
  });
});

describe("scatter-gather", () => {
  it("readv concatenates, writev lays data over the segments in order", async () => {
    const a = memfdWindow(0x2000);
    const t = new DmaTable(8);
    t.add({ iova: 0x0n, size: 0x2000n, offset: 0n, readable: true, writable: true, memory: a.win });
    const { e, dirty } = engine(t);
    const segs = [
      { address: 0x1800n, length: 3 },
      { address: 0x10n, length: 0 },
      { address: 0x100n, length: 5 },
    ];
    await e.writev(segs, Buffer.from("abcdefgh"));
    expect(fdBytes(a.fd, 0x1800, 3).toString()).toBe("abc");
    expect(fdBytes(a.fd, 0x100, 5).toString()).toBe("defgh");
    expect((await e.readv(segs)).toString()).toBe("abcdefgh");
    expect(dirty).toEqual([
      [0x1800n, 3n],
      [0x100n, 5n],
    ]);
    await expect(e.writev(segs, Buffer.from("abc"))).rejects.toMatchObject({ errno: Errno.EINVAL });
    await expect(e.readv([{ address: 0n, length: -1 }])).rejects.toMatchObject({ errno: Errno.EINVAL });
  });

  it("is refused with EPERM while the device may not do DMA", async () => {
    const t = new DmaTable(8);
    const e = new DmaEngine(() => t, () => false);
    await expect(e.readv([])).rejects.toMatchObject({ errno: Errno.EPERM });
    expect(() => e.map([], "read")).toThrow(expect.objectContaining({ errno: Errno.EPERM }));
  });
});

describe("zero-copy views (map)", () => {
  it("are views of guest memory, split at region edges and at the server's mapping windows", () => {
    const a = memfdWindow(0x3000, 0x1000); // three 4 KiB mapping windows
    const b = memfdWindow(0x1000);
    const t = new DmaTable(8);
    t.add({ iova: 0x100000n, size: 0x3000n, offset: 0n, readable: true, writable: true, memory: a.win });
    t.add({ iova: 0x103000n, size: 0x1000n, offset: 0n, readable: true, writable: true, memory: b.win });
    const { e } = engine(t);
    const v = e.map([{ address: 0x100ff0n, length: 0x2020 }], "write")!;
    expect(v).not.toBeNull();
    expect(v.buffers.map((x) => x.length)).toEqual([0x10, 0x1000, 0x1000, 0x10]);
    expect(v.length).toBe(0x2020);
    v.buffers[0]!.fill(1);
    v.buffers[3]!.fill(4);
    expect(fdBytes(a.fd, 0xff0, 0x10)).toEqual(Buffer.alloc(0x10, 1));
    expect(fdBytes(b.fd, 0, 0x10)).toEqual(Buffer.alloc(0x10, 4));
    v.release();
  });

  it("hold pins: unmap waits for the last release, and a closing window takes no new access", async () => {
    const a = memfdWindow(0x1000);
    const t = new DmaTable(8);
    t.add({ iova: 0n, size: 0x1000n, offset: 0n, readable: true, writable: true, memory: a.win });
    const { e } = engine(t);
    const v = e.map([{ address: 0x10n, length: 8 }], "read")!;
    const v2 = e.map([{ address: 0x20n, length: 8 }], "read")!;
    expect(a.win.pinned).toBe(2);
    let idle = false;
    void a.win.idle().then(() => (idle = true));
    a.win.close();
    expect(() => e.map([{ address: 0n, length: 1 }], "read")).toThrow(expect.objectContaining({ errno: Errno.EFAULT }));
    await expect(e.read(0n, 1)).rejects.toMatchObject({ errno: Errno.EFAULT });
    t.removeAll(); // unmap() while views are held: deferred
    expect(v.buffers[0]!.length).toBe(8);
    v.release();
    v.release(); // idempotent
    await Promise.resolve();
    expect(idle).toBe(false);
    expect(v2.buffers[0]!.length).toBe(8);
    v2.release();
    await Promise.resolve();
    expect(idle).toBe(true);
    expect(a.win.pinned).toBe(0);
    expect(v2.buffers[0]!.length).toBe(0); // munmap detached the views
  });

  it("'write' views are logged dirty when mapped and again at release", () => {
    const a = memfdWindow(0x2000);
    const t = new DmaTable(8);
    t.add({ iova: 0x8000n, size: 0x2000n, offset: 0n, readable: true, writable: true, memory: a.win });
    const { e, dirty } = engine(t);
    const r = e.map([{ address: 0x8000n, length: 16 }], "read")!;
    r.release();
    expect(dirty).toEqual([]);
    const w = e.map([{ address: 0x8100n, length: 16 }, { address: 0x9000n, length: 32 }], "write")!;
    expect(dirty).toEqual([
      [0x8100n, 16n],
      [0x9000n, 32n],
    ]);
    w.release();
    expect(dirty.length).toBe(4);
    expect(dirty.slice(2)).toEqual(dirty.slice(0, 2));
  });

  it("return null when any part is fd-less (the caller copies with readv / writev)", () => {
    const a = memfdWindow(0x1000);
    const t = new DmaTable(8);
    t.add({ iova: 0n, size: 0x1000n, offset: 0n, readable: true, writable: true, memory: a.win });
    t.add({ iova: 0x1000n, size: 0x1000n, offset: 0n, readable: true, writable: true, memory: null });
    const { e, dirty } = engine(t);
    expect(e.map([{ address: 0xff0n, length: 0x20 }], "write")).toBeNull();
    expect(a.win.pinned).toBe(0);
    expect(dirty).toEqual([]);
    expect(e.map([{ address: 0x10n, length: 0x20 }], "write")).not.toBeNull();
  });
});

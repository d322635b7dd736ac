import fs from "node:fs";
import { afterEach, describe, expect, it } from "vitest";
import { native } from "../../../src/transport/native.ts";
import { DEFAULT_WINDOW_SIZE, type MappedMemory, mapFd } from "../../../src/transport/mapping.ts";

const fds: number[] = [];
const maps: MappedMemory[] = [];

afterEach(() => {
  for (const m of maps.splice(0)) m.unmap();
  for (const fd of fds.splice(0)) native.close(fd);
});

function memfdWith(content: Buffer): number {
  const fd = native.memfdCreate("mapping-test", BigInt(content.length));
  expect(fd).toBeGreaterThanOrEqual(0);
  fds.push(fd);
  fs.writeSync(fd, content, 0, content.length, 0);
  return fd;
}

function pattern(n: number): Buffer {
  const b = Buffer.allocUnsafe(n);
  for (let i = 0; i < n; i++) b[i] = (i * 31 + (i >> 8)) & 0xff;
  return b;
}

function map(fd: number, offset: bigint, length: bigint, writable: boolean, windowSize?: number): MappedMemory {
  const m = mapFd(fd, offset, length, writable, windowSize);
  maps.push(m);
  return m;
}

function fileBytes(fd: number, offset: number, length: number): Buffer {
  const b = Buffer.alloc(length);
  fs.readSync(fd, b, 0, length, offset);
  return b;
}

describe("mapFd", () => {
  it("uses one 1 GiB window by default for small regions", () => {
    const content = pattern(3 * 4096);
    const m = map(memfdWith(content), 0n, BigInt(content.length), false);
    expect(DEFAULT_WINDOW_SIZE).toBe(1 << 30);
    expect(m.windowCount).toBe(1);
    expect(m.length).toBe(BigInt(content.length));
    expect(m.read(0n, content.length).equals(content)).toBe(true);
  });

  it("reads and writes across window boundaries", () => {
    const size = 5 * 4096 + 123;
    const content = pattern(size);
    const fd = memfdWith(content);
    const m = map(fd, 0n, BigInt(size), true, 4096);
    expect(m.windowCount).toBe(6);

    // a read spanning two windows, and one spanning four
    expect(m.read(4000n, 200).equals(content.subarray(4000, 4200))).toBe(true);
    expect(m.read(100n, 3 * 4096 + 50).equals(content.subarray(100, 100 + 3 * 4096 + 50))).toBe(true);
    // up to the very end
    expect(m.read(BigInt(size - 10), 10).equals(content.subarray(size - 10))).toBe(true);

    // a write spanning two windows reaches the file
    const data = Buffer.alloc(300, 0xab);
    m.write(BigInt(2 * 4096 - 150), data);
    expect(fileBytes(fd, 2 * 4096 - 150, 300).equals(data)).toBe(true);
    expect(fileBytes(fd, 2 * 4096 - 151, 1)[0]).toBe(content[2 * 4096 - 151]);
    expect(fileBytes(fd, 2 * 4096 + 150, 1)[0]).toBe(content[2 * 4096 + 150]);
    // and reads back through the mapping
    expect(m.read(BigInt(2 * 4096 - 150), 300).equals(data)).toBe(true);
  });

  it("handles an fd offset and window size that are not page aligned", () => {
    const size = 20000;
    const content = pattern(size);
    const fd = memfdWith(content);
    const m = map(fd, 777n, 15000n, true, 1000);
    expect(m.windowCount).toBe(15);
    expect(m.read(0n, 15000).equals(content.subarray(777, 777 + 15000))).toBe(true);
    expect(m.read(990n, 30).equals(content.subarray(777 + 990, 777 + 1020))).toBe(true);
    m.write(1995n, Buffer.from("0123456789"));
    expect(fileBytes(fd, 777 + 1995, 10).toString()).toBe("0123456789");
  });

  it("view() is zero-copy inside a window and refuses to cross one", () => {
    const content = pattern(3 * 4096);
    const fd = memfdWith(content);
    const m = map(fd, 0n, BigInt(content.length), true, 4096);
    const v = m.view(4096n + 10n, 100);
    expect(v.equals(content.subarray(4096 + 10, 4096 + 110))).toBe(true);
    v.fill(0x5a);
    expect(fileBytes(fd, 4096 + 10, 100).equals(Buffer.alloc(100, 0x5a))).toBe(true);
    // the exact end of a window is fine, one byte more is not
    expect(m.view(4000n, 96).length).toBe(96);
    expect(() => m.view(4000n, 97)).toThrow(RangeError);
    expect(m.view(0n, 0).length).toBe(0);
  });

  it("rejects ranges outside the mapping", () => {
    const m = map(memfdWith(pattern(8192)), 0n, 8192n, true, 4096);
    expect(() => m.read(8000n, 193)).toThrow(RangeError);
    expect(() => m.read(-1n, 1)).toThrow(RangeError);
    expect(() => m.write(8192n, Buffer.alloc(1))).toThrow(RangeError);
    expect(() => m.view(1n << 60n, 1)).toThrow(RangeError);
    expect(() => m.read(0n, -1)).toThrow(RangeError);
    expect(m.read(8192n, 0).length).toBe(0);
  });

  it("refuses write() on a read-only mapping", () => {
    const content = pattern(4096);
    const m = map(memfdWith(content), 0n, 4096n, false);
    expect(() => m.write(0n, Buffer.from("x"))).toThrow(expect.objectContaining({ code: "EACCES" }));
    expect(m.read(0n, 4096).equals(content)).toBe(true);
  });

  it("unmap() makes every access throw and empties views handed out", () => {
    const content = pattern(3 * 4096);
    const m = mapFd(memfdWith(content), 0n, BigInt(content.length), true, 4096);
    const v = m.view(0n, 4096);
    const r = m.read(4090n, 20); // a copy survives
    m.unmap();
    expect(m.unmapped).toBe(true);
    expect(() => m.read(0n, 1)).toThrow(/unmapped/);
    expect(() => m.write(0n, Buffer.alloc(1))).toThrow(/unmapped/);
    expect(() => m.view(0n, 1)).toThrow(/unmapped/);
    expect(v.length).toBe(0); // detached, not dangling
    expect(v[0]).toBeUndefined();
    expect(r.equals(content.subarray(4090, 4110))).toBe(true);
    m.unmap(); // idempotent
  });

  it("keeps the mapping after the fd is closed", () => {
    const content = pattern(4096);
    const fd = native.memfdCreate("closed-after-map", 4096n);
    fs.writeSync(fd, content, 0, 4096, 0);
    const m = map(fd, 0n, 4096n, false);
    native.close(fd);
    expect(m.read(0n, 4096).equals(content)).toBe(true);
  });

  it("throws an errno error when mmap fails, leaving nothing mapped", () => {
    const efd = native.eventfd(0, 0);
    fds.push(efd);
    expect(() => mapFd(efd, 0n, 4096n, false)).toThrow(expect.objectContaining({ code: "ENODEV", syscall: "mmap" }));
    expect(() => mapFd(-1, 0n, 4096n, false)).toThrow(expect.objectContaining({ code: "EBADF" }));
    expect(() => mapFd(efd, 0n, 0n, false)).toThrow(RangeError);
    expect(() => mapFd(efd, 0n, 4096n, false, 0)).toThrow(RangeError);
  });
});

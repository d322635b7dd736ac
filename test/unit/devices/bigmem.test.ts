import { constants as bufferConstants } from "node:buffer";
import { randomBytes } from "node:crypto";
import { pack, unpack } from "msgpackr";
import { pino } from "pino";
import { describe, expect, it } from "vitest";
import {
  BIGMEM_ID,
  BIGMEM_MSIX_VECTOR,
  BigmemDevice,
  BigmemReg,
  CMD_IRQ,
  CMD_START,
  DMA_TO_GUEST,
  IRQ_CSUM,
  IRQ_DMA,
  STATUS_CSUM_BUSY,
  STATUS_CSUM_ERROR,
  STATUS_DMA_BUSY,
  STATUS_DMA_ERROR,
  bigmemFactory,
  parseBigmemSize,
} from "../../../devices/bigmem/bigmem.ts";
import { DEVICES } from "../../../devices/index.ts";
import type { DeviceContext, InterruptMode } from "../../../src/index.ts";

const PAGE = 4096;
const MiB = 1 << 20;
const GUEST_BASE = 0x1000_0000n;
const GUEST_SIZE = 8 * MiB;

/** Guest RAM at GUEST_BASE, interrupts and DMA calls recorded. */
function fakeContext(mode: InterruptMode = "msi") {
  const guest = Buffer.alloc(GUEST_SIZE);
  const irqs: string[] = [];
  const dmaCalls: { op: "read" | "write"; address: bigint; length: number }[] = [];
  const hooks: { beforeDma?: (call: number) => void; fail?: boolean } = {};
  const where = (address: bigint, length: number): number => {
    if (hooks.fail) throw new Error("bus mastering is off");
    if (address < GUEST_BASE || address + BigInt(length) > GUEST_BASE + BigInt(GUEST_SIZE)) {
      throw new Error(`unmapped 0x${address.toString(16)}+${length}`);
    }
    return Number(address - GUEST_BASE);
  };
  const ctx = {
    running: true as boolean,
    irq: {
      mode,
      setLevel(asserted: boolean) {
        irqs.push(`intx:${asserted ? 1 : 0}`);
      },
      notify(vector = 0) {
        irqs.push(`msi:${vector}`);
        return true;
      },
    },
    dma: {
      async read(address: bigint, length: number): Promise<Buffer> {
        dmaCalls.push({ op: "read", address, length });
        hooks.beforeDma?.(dmaCalls.length);
        const at = where(address, length);
        return Buffer.from(guest.subarray(at, at + length));
      },
      async write(address: bigint, data: Uint8Array): Promise<void> {
        dmaCalls.push({ op: "write", address, length: data.length });
        hooks.beforeDma?.(dmaCalls.length);
        const at = where(address, data.length);
        guest.set(data, at);
      },
      // bigmem moves one range at a time: the scatter-gather calls are not used
      readv: () => Promise.reject(new Error("readv not expected")),
      writev: () => Promise.reject(new Error("writev not expected")),
      map: () => null,
    },
    config: { read: (_o: number, n: number) => Buffer.alloc(n), busMaster: true, memoryEnabled: true },
    log: pino({ level: "silent" }),
  } satisfies DeviceContext;
  return { ctx, guest, irqs, dmaCalls, hooks };
}

function make(size = "4M", mode: InterruptMode = "msi") {
  const dev = new BigmemDevice({ size });
  const f = fakeContext(mode);
  dev.attach(f.ctx);
  return { dev, ...f };
}

const bar = (dev: BigmemDevice, index: number) => dev.bars.find((b) => b.index === index)!;

function r32(dev: BigmemDevice, offset: number): number {
  const b = Buffer.alloc(4);
  bar(dev, 0).read(offset, b);
  return b.readUInt32LE(0);
}
function r64(dev: BigmemDevice, offset: number): bigint {
  const b = Buffer.alloc(8);
  bar(dev, 0).read(offset, b);
  return b.readBigUInt64LE(0);
}
function w32(dev: BigmemDevice, offset: number, v: number): void {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(v >>> 0, 0);
  bar(dev, 0).write(offset, b);
}
function w64(dev: BigmemDevice, offset: number, v: bigint): void {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(v, 0);
  bar(dev, 0).write(offset, b);
}

function memWrite(dev: BigmemDevice, offset: number, data: Uint8Array): void {
  bar(dev, 2).write(offset, Buffer.from(data));
}
function memRead(dev: BigmemDevice, offset: number, length: number): Buffer {
  const b = Buffer.alloc(length);
  bar(dev, 2).read(offset, b);
  return b;
}

const tick = () => new Promise<void>((resolve) => setImmediate(resolve));

/** Turn the event loop until the status busy bits clear. */
async function idle(dev: BigmemDevice): Promise<void> {
  for (let i = 0; i < 1000; i++) {
    if ((r32(dev, BigmemReg.STATUS) & (STATUS_DMA_BUSY | STATUS_CSUM_BUSY)) === 0) return;
    await tick();
  }
  throw new Error("device still busy");
}

function startDma(dev: BigmemDevice, guest: bigint, offset: number, length: number, cmd: number): void {
  w64(dev, BigmemReg.DMA_GUEST, guest);
  w64(dev, BigmemReg.DMA_OFFSET, BigInt(offset));
  w64(dev, BigmemReg.DMA_LENGTH, BigInt(length));
  w32(dev, BigmemReg.DMA_CMD, cmd | CMD_START);
}

function startCsum(dev: BigmemDevice, offset: number, length: number, cmd = 0): void {
  w64(dev, BigmemReg.CSUM_OFFSET, BigInt(offset));
  w64(dev, BigmemReg.CSUM_LENGTH, BigInt(length));
  w32(dev, BigmemReg.CSUM_CMD, cmd | CMD_START);
}

/** FNV-1a, 32 bits, written independently of the device's. */
function referenceFnv(bytes: Uint8Array): number {
  // h * 16777619 mod 2^32, with 16777619 = 2^24 + 403; all steps exact in doubles
  let h = 2166136261;
  for (const b of bytes) {
    h = (h ^ b) >>> 0;
    h = ((h % 256) * 16777216 + h * 403) % 4294967296;
  }
  return h;
}

/** Byte comparison that stays fast for MiB-sized buffers (toEqual walks element by element). */
function expectBytes(actual: Uint8Array, expected: Uint8Array): void {
  expect(actual.length).toBe(expected.length);
  const diff = Buffer.from(actual.buffer, actual.byteOffset, actual.length).compare(expected);
  if (diff !== 0) {
    const at = actual.findIndex((b, i) => b !== expected[i]);
    expect.fail(`bytes differ first at ${at}: ${actual[at]} != ${expected[at]}`);
  }
}

const sorted = (it: Iterable<number>) => [...it].sort((a, b) => a - b);

describe("bigmem identity and registers", () => {
  it("has the documented identity, BARs and interrupts", () => {
    const dev = new BigmemDevice();
    expect(dev.type).toBe("bigmem");
    expect(dev.stateVersion).toBe(2);
    expect(dev.identity).toMatchObject({ vendorId: 0x1234, classCode: 0x050000, revision: 1 });
    expect(dev.identity.deviceId).not.toBe(0x11e8);
    expect(dev.interruptPin).toBe(1);
    expect(dev.capabilities.msi.vectors).toBe(1);
    expect(dev.capabilities.msix).toEqual({ vectors: 3, tableBar: 0, tableOffset: 0xc00, pbaBar: 0, pbaOffset: 0xe00 });
    expect(bar(dev, 0)).toMatchObject({ size: 4096n, kind: "mem32" });
    expect(bar(dev, 2)).toMatchObject({ size: 256n << 20n, kind: "mem64", prefetchable: true });
    expect(dev.precopyMemory).toBeDefined();
    expect(dev.precopyMemory.size).toBe(256n << 20n);
    expect(dev.precopyMemory.pageSize).toBe(4096);
  });

  it("reads the identification and the memory size as 32 or 64 bits", () => {
    for (const [size, bytes] of [["256M", 256n << 20n], ["1G", 1n << 30n], ["4096", 4096n]] as const) {
      const { dev } = make(size);
      expect(r32(dev, BigmemReg.ID)).toBe(BIGMEM_ID);
      expect(r32(dev, BigmemReg.ID) >>> 16).toBe(0xb16e);
      expect(r64(dev, BigmemReg.MEM_SIZE)).toBe(bytes);
      expect(r32(dev, BigmemReg.MEM_SIZE)).toBe(Number(bytes & 0xffffffffn));
      expect(r32(dev, BigmemReg.MEM_SIZE + 4)).toBe(Number(bytes >> 32n));
    }
  });

  it("ignores writes to read-only registers", () => {
    const { dev } = make();
    w32(dev, BigmemReg.ID, 0);
    w64(dev, BigmemReg.MEM_SIZE, 0n);
    w32(dev, BigmemReg.GENERATION, 7);
    w32(dev, BigmemReg.CSUM_RESULT, 7);
    expect(r32(dev, BigmemReg.ID)).toBe(BIGMEM_ID);
    expect(r64(dev, BigmemReg.MEM_SIZE)).toBe(4n << 20n);
    expect(r32(dev, BigmemReg.GENERATION)).toBe(0);
    expect(r32(dev, BigmemReg.CSUM_RESULT)).toBe(0);
  });

  it("reads all ones at reserved offsets and for bad access sizes", () => {
    const { dev } = make();
    expect(r32(dev, 0x04)).toBe(0xffffffff);
    expect(r32(dev, 0x800)).toBe(0xffffffff);
    const two = Buffer.alloc(2);
    bar(dev, 0).read(BigmemReg.ID, two);
    expect(two).toEqual(Buffer.from([0xff, 0xff]));
    const misaligned = Buffer.alloc(8);
    bar(dev, 0).read(0x04, misaligned);
    expect(misaligned).toEqual(Buffer.alloc(8, 0xff));
  });

  it("keeps 64-bit registers writable by halves and whole", () => {
    const { dev } = make();
    w64(dev, BigmemReg.DMA_GUEST, 0x1122_3344_5566_7788n);
    expect(r64(dev, BigmemReg.DMA_GUEST)).toBe(0x1122_3344_5566_7788n);
    w32(dev, BigmemReg.DMA_GUEST + 4, 0xaabbccdd);
    expect(r64(dev, BigmemReg.DMA_GUEST)).toBe(0xaabb_ccdd_5566_7788n);
    w32(dev, BigmemReg.DMA_GUEST, 0x01020304);
    expect(r32(dev, BigmemReg.DMA_GUEST)).toBe(0x01020304);
    expect(r32(dev, BigmemReg.DMA_GUEST + 4)).toBe(0xaabbccdd);
  });
});

describe("bigmem BAR2 memory", () => {
  it("reads back writes of every size at various offsets, up to the last byte", () => {
    const { dev } = make("64K");
    const size = 64 * 1024;
    const cases: [number, number][] = [
      [0, 1], [1, 1], [2, 2], [3, 2], [4, 4], [5, 4], [8, 8], [13, 8],
      [PAGE - 3, 8], [PAGE * 3 + 100, 300], [size - 8, 8], [size - 4, 4], [size - 2, 2], [size - 1, 1],
    ];
    for (const [offset, length] of cases) {
      const data = randomBytes(length);
      memWrite(dev, offset, data);
      expectBytes(memRead(dev, offset, length), data);
    }
    expect(memRead(dev, size - 1, 1)[0]).toBe(dev.readPage(size / PAGE - 1)[PAGE - 1]);
  });

  it("starts zeroed and keeps neighbours intact", () => {
    const { dev } = make("64K");
    expectBytes(memRead(dev, 0, 64), Buffer.alloc(64));
    memWrite(dev, 10, Buffer.from([1, 2, 3, 4]));
    expectBytes(memRead(dev, 8, 8), Buffer.from([0, 0, 1, 2, 3, 4, 0, 0]));
  });
});

describe("bigmem DMA", () => {
  it("copies guest RAM into device memory and interrupts with MSI", async () => {
    const { dev, guest, irqs } = make();
    const data = randomBytes(10_000);
    data.copy(guest, 0x3000);
    startDma(dev, GUEST_BASE + 0x3000n, 0x1234, data.length, CMD_IRQ);
    expect(r32(dev, BigmemReg.STATUS) & STATUS_DMA_BUSY).toBe(STATUS_DMA_BUSY);
    expect(r32(dev, BigmemReg.DMA_CMD) & CMD_START).toBe(CMD_START);
    await idle(dev);
    expectBytes(memRead(dev, 0x1234, data.length), data);
    expect(r32(dev, BigmemReg.GENERATION)).toBe(1);
    expect(r32(dev, BigmemReg.IRQ_STATUS)).toBe(IRQ_DMA);
    expect(r32(dev, BigmemReg.STATUS)).toBe(0);
    expect(r32(dev, BigmemReg.DMA_CMD) & CMD_START).toBe(0);
    expect(irqs).toEqual(["msi:0"]);
    w32(dev, BigmemReg.IRQ_ACK, IRQ_DMA);
    expect(r32(dev, BigmemReg.IRQ_STATUS)).toBe(0);
    expect(irqs).toEqual(["msi:0"]);
  });

  it("with MSI-X: DMA done on vector 2, checksum done on vector 1, IRQ_RAISE on vector 0; no INTx", async () => {
    const { dev, guest, irqs } = make("4M", "msix");
    guest.fill(7, 0, 4096);
    startDma(dev, GUEST_BASE, 0, 4096, CMD_IRQ);
    await idle(dev);
    expect(irqs).toEqual([`msi:${BIGMEM_MSIX_VECTOR.DMA}`]);
    startCsum(dev, 0, 4096, CMD_IRQ);
    await idle(dev);
    expect(irqs).toEqual([`msi:${BIGMEM_MSIX_VECTOR.DMA}`, `msi:${BIGMEM_MSIX_VECTOR.CSUM}`]);
    w32(dev, BigmemReg.IRQ_RAISE, 0x1);
    expect(irqs).toEqual(["msi:2", "msi:1", "msi:0"]);
    expect(r32(dev, BigmemReg.IRQ_STATUS)).toBe(IRQ_DMA | IRQ_CSUM | 0x1);
    w32(dev, BigmemReg.IRQ_ACK, 0xffffffff);
    expect(r32(dev, BigmemReg.IRQ_STATUS)).toBe(0);
    expect(irqs.filter((i) => i.startsWith("intx"))).toEqual([]);
  });

  it("copies device memory into guest RAM and interrupts with INTx", async () => {
    const { dev, guest, irqs } = make("4M", "intx");
    const data = randomBytes(3 * PAGE + 17);
    memWrite(dev, 0x20_0000, data);
    startDma(dev, GUEST_BASE + 0x10n, 0x20_0000, data.length, DMA_TO_GUEST | CMD_IRQ);
    await idle(dev);
    expectBytes(guest.subarray(0x10, 0x10 + data.length), data);
    expect(r32(dev, BigmemReg.GENERATION)).toBe(1);
    expect(irqs).toEqual(["intx:1"]);
    w32(dev, BigmemReg.IRQ_ACK, IRQ_DMA);
    expect(irqs).toEqual(["intx:1", "intx:0"]);
  });

  it("raises no interrupt without the interrupt bit and counts generations", async () => {
    const { dev, irqs } = make();
    for (let i = 1; i <= 3; i++) {
      startDma(dev, GUEST_BASE, 0, 64, i % 2 ? 0 : DMA_TO_GUEST);
      await idle(dev);
      expect(r32(dev, BigmemReg.GENERATION)).toBe(i);
    }
    startDma(dev, GUEST_BASE, 0, 0, 0);
    await idle(dev);
    expect(r32(dev, BigmemReg.GENERATION)).toBe(4);
    expect(irqs).toEqual([]);
  });

  it("moves large transfers in chunks of at most 1 MiB", async () => {
    const { dev, guest, dmaCalls } = make("8M");
    const length = 5 * MiB / 2 + 3;
    randomBytes(length).copy(guest, 0);
    startDma(dev, GUEST_BASE, MiB, length, 0);
    await idle(dev);
    expectBytes(memRead(dev, MiB, length), guest.subarray(0, length));
    expect(dmaCalls.map((c) => c.length)).toEqual([MiB, MiB, MiB / 2 + 3]);
    expect(dmaCalls.map((c) => c.address)).toEqual([GUEST_BASE, GUEST_BASE + BigInt(MiB), GUEST_BASE + BigInt(2 * MiB)]);
    dmaCalls.length = 0;
    guest.fill(0);
    startDma(dev, GUEST_BASE + 1n, MiB, length, DMA_TO_GUEST);
    await idle(dev);
    expect(dmaCalls.every((c) => c.op === "write" && c.length <= MiB)).toBe(true);
    expectBytes(guest.subarray(1, 1 + length), memRead(dev, MiB, length));
  });

  it("waits while the device is stopped and runs after runStateChanged(true)", async () => {
    const { dev, ctx, guest, irqs, dmaCalls } = make();
    guest.fill(0x5a, 0, 100);
    ctx.running = false;
    startDma(dev, GUEST_BASE, 0, 100, CMD_IRQ);
    for (let i = 0; i < 10; i++) await tick();
    expect(dmaCalls).toEqual([]);
    expect(r32(dev, BigmemReg.STATUS) & STATUS_DMA_BUSY).toBe(STATUS_DMA_BUSY);
    expect(irqs).toEqual([]);
    ctx.running = true;
    dev.runStateChanged(true);
    await idle(dev);
    expectBytes(memRead(dev, 0, 100), Buffer.alloc(100, 0x5a));
    expect(irqs).toEqual(["msi:0"]);
  });

  it("drops a chunk that completes after a stop and redoes it on resume", async () => {
    const { dev, ctx, guest, hooks, dmaCalls } = make();
    const length = 3 * MiB;
    randomBytes(length).copy(guest, 0);
    hooks.beforeDma = (n) => {
      if (n === 2) {
        ctx.running = false;
        dev.runStateChanged(false);
      }
    };
    startDma(dev, GUEST_BASE, 0, length, 0);
    for (let i = 0; i < 20; i++) await tick();
    expect(dmaCalls.length).toBe(2);
    expect(r32(dev, BigmemReg.STATUS) & STATUS_DMA_BUSY).toBe(STATUS_DMA_BUSY);
    expect((dev.saveState() as { dmaDone: number }).dmaDone).toBe(MiB);
    expectBytes(memRead(dev, MiB, 16), Buffer.alloc(16));
    hooks.beforeDma = undefined;
    ctx.running = true;
    dev.runStateChanged(true);
    await idle(dev);
    expect(dmaCalls.map((c) => c.address - GUEST_BASE)).toEqual([0n, 1n << 20n, 1n << 20n, 2n << 20n]);
    expectBytes(memRead(dev, 0, length), guest.subarray(0, length));
    expect(r32(dev, BigmemReg.GENERATION)).toBe(1);
  });

  it("sets the error bit on a bad range or a rejected DMA, and still interrupts", async () => {
    const { dev, hooks, irqs } = make();
    startDma(dev, GUEST_BASE, 4 * MiB - 10, 11, CMD_IRQ);
    await idle(dev);
    expect(r32(dev, BigmemReg.STATUS)).toBe(STATUS_DMA_ERROR);
    expect(r32(dev, BigmemReg.GENERATION)).toBe(0);
    expect(irqs).toEqual(["msi:0"]);
    w32(dev, BigmemReg.STATUS, STATUS_DMA_ERROR);
    expect(r32(dev, BigmemReg.STATUS)).toBe(0);

    startDma(dev, 0xffff_ffff_ffff_fff0n, 0, 0x20, 0);
    await idle(dev);
    expect(r32(dev, BigmemReg.STATUS)).toBe(STATUS_DMA_ERROR);

    startDma(dev, GUEST_BASE - 0x1000n, 0, 16, 0); // unmapped
    expect(r32(dev, BigmemReg.STATUS)).toBe(STATUS_DMA_BUSY); // start clears the old error
    await idle(dev);
    expect(r32(dev, BigmemReg.STATUS)).toBe(STATUS_DMA_ERROR);

    hooks.fail = true;
    startDma(dev, GUEST_BASE, 0, 16, DMA_TO_GUEST);
    await idle(dev);
    expect(r32(dev, BigmemReg.STATUS)).toBe(STATUS_DMA_ERROR);
    hooks.fail = false;
    startDma(dev, GUEST_BASE, 0, 16, DMA_TO_GUEST);
    await idle(dev);
    expect(r32(dev, BigmemReg.STATUS)).toBe(0);
    expect(r32(dev, BigmemReg.GENERATION)).toBe(1);
  });

  it("ignores parameter writes and a second start while busy", async () => {
    const { dev, ctx, dmaCalls } = make();
    ctx.running = false;
    startDma(dev, GUEST_BASE, 0, 32, 0);
    w64(dev, BigmemReg.DMA_GUEST, 0n);
    w64(dev, BigmemReg.DMA_OFFSET, 99n);
    w64(dev, BigmemReg.DMA_LENGTH, 1n);
    w32(dev, BigmemReg.DMA_CMD, CMD_START | DMA_TO_GUEST);
    expect(r64(dev, BigmemReg.DMA_GUEST)).toBe(GUEST_BASE);
    expect(r64(dev, BigmemReg.DMA_OFFSET)).toBe(0n);
    expect(r64(dev, BigmemReg.DMA_LENGTH)).toBe(32n);
    expect(r32(dev, BigmemReg.DMA_CMD)).toBe(CMD_START);
    ctx.running = true;
    dev.runStateChanged(true);
    await idle(dev);
    expect(dmaCalls).toEqual([{ op: "read", address: GUEST_BASE, length: 32 }]);
  });

  it("marks raise/acknowledge like edu", () => {
    const { dev, irqs } = make("4M", "intx");
    w32(dev, BigmemReg.IRQ_RAISE, 0x5);
    expect(r32(dev, BigmemReg.IRQ_STATUS)).toBe(0x5);
    w32(dev, BigmemReg.IRQ_ACK, 0x1);
    expect(irqs).toEqual(["intx:1"]);
    w32(dev, BigmemReg.IRQ_ACK, 0x4);
    expect(irqs).toEqual(["intx:1", "intx:0"]);
    expect(r32(dev, BigmemReg.IRQ_RAISE)).toBe(0);
  });
});

describe("bigmem checksum", () => {
  it("matches FNV-1a of the range, across several steps", async () => {
    const { dev, irqs } = make("16M");
    const data = randomBytes(9 * MiB + 5);
    memWrite(dev, 3, data);
    startCsum(dev, 3, data.length, CMD_IRQ);
    expect(r32(dev, BigmemReg.STATUS)).toBe(STATUS_CSUM_BUSY);
    await idle(dev);
    expect(r32(dev, BigmemReg.CSUM_RESULT)).toBe(referenceFnv(data));
    expect(r32(dev, BigmemReg.IRQ_STATUS)).toBe(IRQ_CSUM);
    expect(irqs).toEqual(["msi:0"]);
  });

  it("gives the FNV basis for an empty range and checks the whole memory", async () => {
    const { dev } = make("64K");
    startCsum(dev, 100, 0);
    await idle(dev);
    expect(r32(dev, BigmemReg.CSUM_RESULT)).toBe(0x811c9dc5);
    startCsum(dev, 0, 64 * 1024);
    await idle(dev);
    expect(r32(dev, BigmemReg.CSUM_RESULT)).toBe(referenceFnv(new Uint8Array(64 * 1024)));
  });

  it("sets the error bit for a range past the end", async () => {
    const { dev } = make("64K");
    startCsum(dev, 64 * 1024 - 1, 2);
    await idle(dev);
    expect(r32(dev, BigmemReg.STATUS)).toBe(STATUS_CSUM_ERROR);
    w32(dev, BigmemReg.STATUS, STATUS_CSUM_ERROR);
    expect(r32(dev, BigmemReg.STATUS)).toBe(0);
  });

  it("runs only while the device may run", async () => {
    const { dev, ctx } = make("64K");
    ctx.running = false;
    startCsum(dev, 0, 10);
    for (let i = 0; i < 10; i++) await tick();
    expect(r32(dev, BigmemReg.STATUS)).toBe(STATUS_CSUM_BUSY);
    ctx.running = true;
    dev.runStateChanged(true);
    await idle(dev);
    expect(r32(dev, BigmemReg.CSUM_RESULT)).toBe(referenceFnv(new Uint8Array(10)));
  });
});

describe("bigmem dirty tracking", () => {
  it("marks every page dirty at start and hands them out once", () => {
    const { dev } = make("1M");
    const mem = dev.precopyMemory;
    expect(mem.dirtyPageCount()).toBe(0);
    mem.startTracking();
    expect(mem.dirtyPageCount()).toBe(256);
    expect(sorted(mem.takeDirtyPages())).toEqual([...Array(256).keys()]);
    expect(mem.dirtyPageCount()).toBe(0);
    expect([...mem.takeDirtyPages()]).toEqual([]);
  });

  it("handles memories of fewer than 32 pages", () => {
    const { dev } = make("16K");
    dev.startTracking();
    expect(dev.dirtyPageCount()).toBe(4);
    expect(sorted(dev.takeDirtyPages())).toEqual([0, 1, 2, 3]);
  });

  it("dirties exactly the pages MMIO writes and DMA into memory touch", async () => {
    const { dev } = make("4M");
    const mem = dev.precopyMemory;
    mem.startTracking();
    [...mem.takeDirtyPages()];
    memWrite(dev, 3 * PAGE + 7, Buffer.from([1]));
    memWrite(dev, 10 * PAGE - 4, Buffer.alloc(8, 1)); // spans pages 9 and 10
    memWrite(dev, 4 * MiB - 1, Buffer.from([1])); // last byte: page 1023
    memWrite(dev, 3 * PAGE, Buffer.from([2])); // page 3 again
    expect(mem.dirtyPageCount()).toBe(4);
    expect(sorted(mem.takeDirtyPages())).toEqual([3, 9, 10, 1023]);

    startDma(dev, GUEST_BASE, 40 * PAGE + 100, PAGE, 0); // pages 40 and 41
    await idle(dev);
    startDma(dev, GUEST_BASE, 0, 700 * PAGE, DMA_TO_GUEST); // reads device memory only
    await idle(dev);
    memRead(dev, 500 * PAGE, 64);
    expect(mem.dirtyPageCount()).toBe(2);
    expect(sorted(mem.takeDirtyPages())).toEqual([40, 41]);

    startDma(dev, GUEST_BASE, MiB - PAGE, MiB + 2 * PAGE, 0); // pages 255..512
    await idle(dev);
    expect(sorted(mem.takeDirtyPages())).toEqual(Array.from({ length: 258 }, (_, i) => 255 + i));
  });

  it("records nothing while not tracking, and stopTracking forgets", () => {
    const { dev } = make("1M");
    memWrite(dev, 0, Buffer.from([1]));
    expect(dev.dirtyPageCount()).toBe(0);
    dev.startTracking();
    dev.stopTracking();
    expect(dev.dirtyPageCount()).toBe(0);
    expect([...dev.takeDirtyPages()]).toEqual([]);
    memWrite(dev, 0, Buffer.from([1]));
    expect(dev.dirtyPageCount()).toBe(0);
  });

  it("hands every dirty page over at once as a fresh ascending Uint32Array and clears them", () => {
    const { dev } = make("1M");
    dev.startTracking();
    const all = dev.takeDirtyPages();
    expect(all).toBeInstanceOf(Uint32Array);
    expect([...all]).toEqual([...Array(256).keys()]);
    for (const p of [200, 1, 33, 2, 5, 31, 32]) memWrite(dev, p * PAGE, Buffer.from([p]));
    const taken = dev.takeDirtyPages();
    expect([...taken]).toEqual([1, 2, 5, 31, 32, 33, 200]);
    expect(dev.dirtyPageCount()).toBe(0);
    memWrite(dev, 5 * PAGE, Buffer.from([9]));
    // the array handed out earlier is the caller's: a later write does not change it
    expect([...taken]).toEqual([1, 2, 5, 31, 32, 33, 200]);
    expect([...dev.takeDirtyPages()]).toEqual([5]);
  });

  it("counts a page written while its word is being handed out", () => {
    const { dev } = make("1M");
    dev.startTracking();
    [...dev.takeDirtyPages()];
    memWrite(dev, 1 * PAGE, Buffer.from([1]));
    memWrite(dev, 2 * PAGE, Buffer.from([1]));
    const got: number[] = [];
    for (const p of dev.takeDirtyPages()) {
      got.push(p);
      if (p === 1) memWrite(dev, 1 * PAGE, Buffer.from([9])); // after it was taken
    }
    expect(got).toEqual([1, 2]);
    expect(dev.dirtyPageCount()).toBe(1);
    expect([...dev.takeDirtyPages()]).toEqual([1]);
  });

  it("reads pages as views and writes them as copies", () => {
    const { dev } = make("64K");
    const view = dev.readPage(3);
    expect(view.length).toBe(PAGE);
    memWrite(dev, 3 * PAGE + 5, Buffer.from([0xab]));
    expect(view[5]).toBe(0xab);
    const page = randomBytes(PAGE);
    dev.writePage(15, page);
    page[0] = page[0]! ^ 0xff;
    expectBytes(memRead(dev, 15 * PAGE + 1, PAGE - 1), page.subarray(1));
    expect(memRead(dev, 15 * PAGE, 1)[0]).toBe(page[0]! ^ 0xff);
    expect(() => dev.readPage(16)).toThrow(RangeError);
    expect(() => dev.readPage(-1)).toThrow(RangeError);
    expect(() => dev.readPage(1.5)).toThrow(RangeError);
    expect(() => dev.writePage(16, new Uint8Array(PAGE))).toThrow(RangeError);
    expect(() => dev.writePage(0, new Uint8Array(PAGE - 1))).toThrow(RangeError);
    expect(() => dev.writePage(0, new Uint8Array(PAGE + 1))).toThrow(RangeError);
  });

  it("copies the memory to another device page by page", () => {
    const { dev: src } = make("64K");
    const { dev: dst } = make("64K");
    memWrite(src, 1000, randomBytes(20_000));
    src.startTracking();
    for (const p of src.takeDirtyPages()) dst.writePage(p, src.readPage(p));
    expectBytes(memRead(dst, 0, 64 * 1024), memRead(src, 0, 64 * 1024));
  });
});

describe("bigmem state", () => {
  it("round-trips the registers through msgpack", async () => {
    const { dev: src } = make("1M", "intx");
    startDma(src, GUEST_BASE, 0, 16, CMD_IRQ);
    await idle(src);
    startCsum(src, 0, 100);
    await idle(src);
    w32(src, BigmemReg.IRQ_RAISE, 0x40);
    w64(src, BigmemReg.DMA_GUEST, 0xdead_beef_0000_1000n);
    w64(src, BigmemReg.DMA_LENGTH, 0x1234n);
    w64(src, BigmemReg.CSUM_OFFSET, 0x300n);

    const { dev: dst, irqs } = make("1M", "intx");
    dst.loadState(unpack(pack(src.saveState())));
    expect(dst.saveState()).toEqual(src.saveState());
    for (const reg of [0x00, 0x08, 0x0c, 0x10, 0x14, 0x18, 0x40, 0x44, 0x48, 0x50, 0x58, 0x60, 0x68, 0x70, 0x74]) {
      expect(r32(dst, reg)).toBe(r32(src, reg));
    }
    expect(r32(dst, BigmemReg.GENERATION)).toBe(1);
    expect(r32(dst, BigmemReg.IRQ_STATUS)).toBe(IRQ_DMA | 0x40);
    dst.runStateChanged(true);
    expect(irqs).toEqual(["intx:1"]); // the line comes back up
    dst.runStateChanged(false);
    dst.runStateChanged(true);
    expect(irqs).toEqual(["intx:1"]); // and is not pulled again on a plain resume
  });

  it("finishes on the destination a DMA stopped half way", async () => {
    const { dev: src, ctx, guest, hooks } = make();
    randomBytes(3 * MiB).copy(guest, 0);
    hooks.beforeDma = (n) => {
      if (n === 2) ctx.running = false;
    };
    startDma(src, GUEST_BASE, 0, 3 * MiB, CMD_IRQ);
    for (let i = 0; i < 20; i++) await tick();
    const state = unpack(pack(src.saveState()));

    const { dev: dst, ctx: dctx, guest: dguest, irqs } = make();
    guest.copy(dguest);
    dctx.running = false;
    for (let p = 0; p < 1024; p++) dst.writePage(p, src.readPage(p));
    dst.loadState(state);
    expect(r32(dst, BigmemReg.STATUS)).toBe(STATUS_DMA_BUSY);
    dctx.running = true;
    dst.runStateChanged(true);
    await idle(dst);
    expectBytes(memRead(dst, 0, 3 * MiB), guest.subarray(0, 3 * MiB));
    expect(r32(dst, BigmemReg.GENERATION)).toBe(1);
    expect(irqs).toEqual(["msi:0"]);
  });

  it("restarts a checksum in progress on the destination", async () => {
    const { dev: src, ctx } = make("8M");
    const data = randomBytes(8 * MiB);
    memWrite(src, 0, data);
    startCsum(src, 0, 8 * MiB); // two 4 MiB steps
    await tick();
    ctx.running = false;
    await tick();
    expect(r32(src, BigmemReg.STATUS)).toBe(STATUS_CSUM_BUSY);
    const { dev: dst } = make("8M");
    for (let p = 0; p < 2048; p++) dst.writePage(p, src.readPage(p));
    dst.loadState(unpack(pack(src.saveState())));
    expect(r32(dst, BigmemReg.STATUS)).toBe(STATUS_CSUM_BUSY);
    dst.runStateChanged(true);
    await idle(dst);
    expect(r32(dst, BigmemReg.CSUM_RESULT)).toBe(referenceFnv(data));
  });

  it("accepts small numbers where bigints were saved", () => {
    const { dev } = make("1M");
    const state = { ...(dev.saveState() as Record<string, unknown>), memSize: 1 << 20, dmaGuest: 5 };
    dev.loadState(state);
    expect(r64(dev, BigmemReg.DMA_GUEST)).toBe(5n);
  });

  it("rejects nonsense and leaves the device as it was", () => {
    const { dev } = make("1M");
    w64(dev, BigmemReg.DMA_GUEST, 77n);
    const good = dev.saveState() as Record<string, unknown>;
    const bad: unknown[] = [
      null,
      undefined,
      42,
      "state",
      [],
      {},
      { ...good, status: "0" },
      { ...good, status: STATUS_DMA_BUSY },
      { ...good, generation: -1 },
      { ...good, generation: 2 ** 32 },
      { ...good, irqStatus: 1.5 },
      { ...good, dmaGuest: -1n },
      { ...good, dmaGuest: 1n << 64n },
      { ...good, dmaOffset: "0" },
      { ...good, dmaCmd: 0x8 },
      { ...good, csumCmd: DMA_TO_GUEST },
      { ...good, memSize: 2n << 20n },
      { ...good, dmaDone: 4 },
      { ...good, dmaCmd: CMD_START, dmaLength: 4n, dmaDone: 5 },
      { ...good, extra: 1 },
      Object.fromEntries(Object.entries(good).filter(([k]) => k !== "csumResult")),
    ];
    for (const state of bad) {
      expect(() => dev.loadState(state), JSON.stringify(state, (_k, v) => (typeof v === "bigint" ? `${v}n` : v))).toThrow(Error);
    }
    expect(r64(dev, BigmemReg.DMA_GUEST)).toBe(77n);
  });

  it("resets registers to power-on and memory to zero", async () => {
    const { dev } = make("64K");
    startDma(dev, GUEST_BASE, 0, 16, CMD_IRQ);
    await idle(dev);
    memWrite(dev, 100, Buffer.alloc(10, 7));
    const view = dev.readPage(0);
    dev.startTracking();
    [...dev.takeDirtyPages()];
    dev.reset();
    expect(dev.saveState()).toEqual(new BigmemDevice({ size: "64K" }).saveState());
    expectBytes(memRead(dev, 0, 64 * 1024), Buffer.alloc(64 * 1024));
    expect(view[100]).toBe(7); // an old view is not the memory any more
    expect(dev.dirtyPageCount()).toBe(16);
  });

  it("abandons a DMA in flight at reset", async () => {
    const { dev, guest, hooks } = make();
    guest.fill(1, 0, 2 * MiB);
    hooks.beforeDma = (n) => {
      if (n === 1) dev.reset();
    };
    startDma(dev, GUEST_BASE, 0, 2 * MiB, CMD_IRQ);
    for (let i = 0; i < 20; i++) await tick();
    expectBytes(memRead(dev, 0, 2 * MiB), Buffer.alloc(2 * MiB));
    expect(r32(dev, BigmemReg.STATUS)).toBe(0);
    expect(r32(dev, BigmemReg.GENERATION)).toBe(0);
  });
});

describe("bigmem options", () => {
  it("parses sizes with suffixes", () => {
    expect(parseBigmemSize("4096")).toBe(4096n);
    expect(parseBigmemSize("0x1000")).toBe(4096n);
    expect(parseBigmemSize("64K")).toBe(64n << 10n);
    expect(parseBigmemSize("256M")).toBe(256n << 20n);
    expect(parseBigmemSize("256m")).toBe(256n << 20n);
    expect(parseBigmemSize("1G")).toBe(1n << 30n);
    expect(parseBigmemSize("1GiB")).toBe(1n << 30n);
    expect(parseBigmemSize("4G")).toBe(4n << 30n);
  });

  it("refuses bad sizes with a clear message", () => {
    for (const bad of ["", "abc", "-4096", "1.5G", "256 MB x", "2048", "100", "3M", "0", "12K", "1P", `${BigInt(bufferConstants.MAX_LENGTH) * 2n}`]) {
      expect(() => parseBigmemSize(bad), bad).toThrow(/^bigmem: size=/);
    }
    expect(() => bigmemFactory.create({ size: "3M" })).toThrow(/power of two/);
  });

  it("is registered and rejects unknown options", () => {
    expect(DEVICES).toContain(bigmemFactory);
    expect(bigmemFactory.name).toBe("bigmem");
    expect(Object.keys(bigmemFactory.options ?? {})).toEqual(["size"]);
    const dev = bigmemFactory.create({ size: "1M" });
    expect(dev.precopyMemory?.size).toBe(1n << 20n);
    expect(() => bigmemFactory.create({ szie: "1M" })).toThrow("bigmem: unknown option 'szie' (known: size)");
  });
});

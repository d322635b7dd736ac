/**
 * Eventfds never block the event loop (issue 9, part 2, item 7).
 *
 * An eventfd's counter tops out at 2^64 - 2; a write that would pass it
 * blocks until the reader drains it, unless the file is O_NONBLOCK. A client
 * that hands over a blocking eventfd with its counter preset to 2^64 - 2
 * used to hang the whole server on the device's next interrupt (a blocking
 * write on the event loop). The server now sets O_NONBLOCK on every eventfd
 * it takes (the flag lives in the open file description, which the client
 * shares: QEMU's event notifiers are non-blocking already), a loopback
 * trigger that cannot be delivered is answered with EAGAIN, and a
 * device-initiated interrupt that cannot be delivered is counted and
 * logged with a rate limit.
 *
 * The server runs in its own process: before the fix it hung for good.
 */
import fs from "node:fs";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Command, Errno, IrqIndex, IrqSetFlags, RegionIndex } from "../../protocol/index.ts";
import { native } from "../../src/transport/native.ts";
import { readEventfd } from "../../src/client/index.ts";
import { ChildServer, RawClient, eventfd, eventually, healthProbe, le } from "./raw-client.ts";

const EDU_IRQ_RAISE = 0x60;
const O_NONBLOCK = 0o4000;
const FULL = 0xffff_ffff_ffff_fffen;

const setIrqs = (o: { flags: number; index: number; start?: number; count: number }): Buffer =>
  le().u32(20).u32(o.flags).u32(o.index).u32(o.start ?? 0).u32(o.count).buf;

/** A blocking eventfd whose counter is already at its maximum (2^64 - 2). */
function fullBlockingEventfd(): number {
  const fd = eventfd();
  expect(native.setNonblocking(fd, false)).toBe(0);
  const v = Buffer.alloc(8);
  v.writeBigUInt64LE(FULL);
  fs.writeSync(fd, v); // 0 -> 2^64 - 2: fits, does not block
  return fd;
}

function fdFlags(fd: number): number {
  const m = /flags:\s+([0-7]+)/.exec(fs.readFileSync(`/proc/self/fdinfo/${fd}`, "utf8"));
  return parseInt(m![1]!, 8);
}

/** Reads (and clears) the counter without blocking. */
function counter(fd: number): bigint {
  native.setNonblocking(fd, true);
  return readEventfd(fd);
}

/** Config-space offset of the MSI capability (id 5). */
async function msiCap(c: RawClient): Promise<number> {
  let ptr = (await c.read(RegionIndex.CONFIG, 0x34n, 1))[0]! & 0xfc;
  while (ptr !== 0) {
    const hdr = await c.read(RegionIndex.CONFIG, BigInt(ptr), 2);
    if (hdr[0] === 0x05) return ptr;
    ptr = hdr[1]! & 0xfc;
  }
  throw new Error("no MSI capability");
}

interface LogLine {
  msg: string;
  level: number;
  [k: string]: unknown;
}

describe("a hostile eventfd (blocking, counter at 2^64 - 2) does not hang the server", () => {
  let srv: ChildServer;
  let logFile: string;
  let fd = -1;
  const lines = (): LogLine[] =>
    fs.existsSync(logFile)
      ? fs
          .readFileSync(logFile, "utf8")
          .split("\n")
          .filter((l) => l !== "")
          .map((l) => JSON.parse(l) as LogLine)
      : [];
  /** The server's log lines written since `mark` (lines().length when the case began): cases share the server and its log. */
  const linesSince = (mark: number): LogLine[] => lines().slice(mark);

  beforeAll(async () => {
    const dir = fs.mkdtempSync(path.join(fs.realpathSync("/tmp"), "vfu-efd-"));
    logFile = path.join(dir, "server.log");
    srv = await ChildServer.start({ device: "edu", logLevel: "info", logFile });
  });
  afterAll(async () => {
    if (fd >= 0) native.close(fd);
    await srv?.stop();
    fs.rmSync(path.dirname(logFile), { recursive: true, force: true });
  });

  it("the device's MSI goes to a full eventfd: the server keeps serving, the interrupt is counted and logged", async () => {
    const mark = lines().length;
    const c = await RawClient.ready(srv.socketPath);
    fd = fullBlockingEventfd();
    expect(fdFlags(fd) & O_NONBLOCK).toBe(0);
    const cap = await msiCap(c);
    await c.write(RegionIndex.CONFIG, BigInt(cap + 2), le().u16(1).buf); // MSI enable
    expect(await c.errno(Command.DEVICE_SET_IRQS, setIrqs({ flags: IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER, index: IrqIndex.MSI, count: 1 }), { fds: [fd] })).toBe(0);

    // the device raises its interrupt: the eventfd cannot take it
    c.send(Command.REGION_WRITE, le().u64(EDU_IRQ_RAISE).u32(RegionIndex.BAR0).u32(4).u32(1).buf);
    // a fresh client is served within the deadline (before: the server hung in write())
    c.close();
    await c.waitClosed();
    expect(await healthProbe(srv.socketPath, 5000)).toBe(0x1234);
    // the server made the (shared) file description non-blocking
    expect(fdFlags(fd) & O_NONBLOCK).toBe(O_NONBLOCK);
    const warned = linesSince(mark).filter((l) => l.msg === "interrupt not delivered");
    expect(warned.length).toBe(1);
    expect(warned[0]).toMatchObject({ index: IrqIndex.MSI, vector: 0, errno: Errno.EAGAIN, undelivered: 1 });
    expect(warned[0]!.level).toBe(40);
  });

  it("a loopback trigger (SET_IRQS DATA_NONE | TRIGGER) that cannot be delivered is answered with EAGAIN", async () => {
    const c = await RawClient.ready(srv.socketPath);
    const cap = await msiCap(c);
    await c.write(RegionIndex.CONFIG, BigInt(cap + 2), le().u16(1).buf);
    const full = fullBlockingEventfd();
    expect(await c.errno(Command.DEVICE_SET_IRQS, setIrqs({ flags: IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER, index: IrqIndex.MSI, count: 1 }), { fds: [full] })).toBe(0);
    expect(await c.errno(Command.DEVICE_SET_IRQS, setIrqs({ flags: IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER, index: IrqIndex.MSI, count: 1 }))).toBe(Errno.EAGAIN);
    expect(await c.vendorId()).toBe(0x1234);
    // drained by the client, the eventfd takes interrupts again
    expect(counter(full)).toBe(FULL);
    expect(await c.errno(Command.DEVICE_SET_IRQS, setIrqs({ flags: IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER, index: IrqIndex.MSI, count: 1 }))).toBe(0);
    expect(counter(full)).toBe(1n);
    c.close();
    await c.waitClosed();
    native.close(full);
  });

  it("2000 undeliverable device interrupts: at most a burst of warnings, the count in the log", async () => {
    const mark = lines().length;
    const c = await RawClient.ready(srv.socketPath);
    const cap = await msiCap(c);
    await c.write(RegionIndex.CONFIG, BigInt(cap + 2), le().u16(1).buf);
    const full = fullBlockingEventfd();
    expect(await c.errno(Command.DEVICE_SET_IRQS, setIrqs({ flags: IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER, index: IrqIndex.MSI, count: 1 }), { fds: [full] })).toBe(0);
    for (let i = 0; i < 2000; i++) c.send(Command.REGION_WRITE, le().u64(EDU_IRQ_RAISE).u32(RegionIndex.BAR0).u32(4).u32(1).buf);
    expect(await c.vendorId()).toBe(0x1234);
    c.close();
    await c.waitClosed();
    native.close(full);
    const n = linesSince(mark).filter((l) => l.msg === "interrupt not delivered").length;
    console.log(`2000 undeliverable interrupts -> ${n} "interrupt not delivered" lines`);
    expect(n).toBeGreaterThan(0);
    expect(n).toBeLessThanOrEqual(25);
    // the disconnect line sums up what the limiter dropped
    expect(await eventually(() => linesSince(mark).some((l) => l.msg === "client disconnected" && typeof l.suppressedLogLines === "number"), 3000)).toBe(true);
  });
});

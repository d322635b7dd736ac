/**
 * Hostile use of resources, against servers in child processes (a stalled
 * or ballooning server must not take the test runner with it): memory a
 * client can make the server hold (by the server's own accounting and V8's
 * figures, not RSS), fds that block the server when it writes to them,
 * device registers that stall the event loop.
 */
import { BIGMEM_STATE_VERSION } from "../../devices/bigmem/bigmem.ts";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { afterAll, afterEach, describe, expect, it } from "vitest";
import { Command, Feature, FeatureFlags, HEADER_SIZE, IrqIndex, IrqSetFlags, MigState, RegionIndex, maxFrameSizeFor } from "../../protocol/index.ts";
import { StateStreamWriter } from "../../src/migration/state-stream.ts";
import { SEND_HIGH_WATER } from "../../src/transport/unix-socket.ts";
import { native } from "../../src/transport/native.ts";
import { ChildServer, DeafClient, RawClient, eventfd, healthProbe, le, sleep, tmpDir, versionBody } from "./raw-client.ts";

const VENDOR = 0x1234;
const MiB = 1 << 20;
const servers: ChildServer[] = [];

async function server(opts: Parameters<typeof ChildServer.start>[0] = {}): Promise<ChildServer> {
  const s = await ChildServer.start(opts);
  servers.push(s);
  return s;
}
afterEach(async () => {
  for (const s of servers.splice(0)) await s.kill("SIGKILL").then(() => s.stop());
});

const migSet = (state: number): Buffer => le().u32(16).u32(Feature.MIG_DEVICE_STATE | FeatureFlags.SET).u32(state).s32(-1).buf;
const setIrqs = (flags: number, index: number, count: number): Buffer => le().u32(20).u32(flags).u32(index).u32(0).u32(count).buf;

/*
 * What the server holds is read from its own accounting (VfioUserServer.stats()
 * through the child's "stats" command: decoder, send queue and resume-stream
 * high-water marks) and from V8's heap figures after a full GC (heapUsed,
 * external, arrayBuffers). RSS is printed, never asserted: after GC it varies
 * by 8..45 MiB from run to run while the V8 figures stay flat, so it measures
 * the allocator, not the server.
 *
 * Bounds come from the design:
 * - send queue: back-pressure stops reading requests once more than
 *   SEND_HIGH_WATER (4 MiB) is queued, so the queue is at most that plus the
 *   one reply that crossed it;
 * - decoder: a frame is buffered only after its header passed the size
 *   check, so at most the largest frame sent (here never above max_data_xfer_size
 *   plus its fixed part);
 * - resume stream: RESUME_BUFFER_BOUND below;
 * - V8 memory after GC: what the accounting says is held, plus SLACK for
 *   everything else a connection allocates (its decoder, reply buffer, logger
 *   child, JIT-compiled code's data): measured under 0.2 MiB, 1 MiB allowed.
 */
const SLACK = 1 * MiB;
/** Data bytes of every MEMORY record the RESUMING cases send. */
const RECORD_DATA = MiB;
/**
 * The most resume-stream bytes the server may hold at once
 * (resumeBufferHighWater) while a client streams MEMORY records: MEMORY
 * payload goes into device memory as it arrives, so only HEADER and STATE
 * payloads are buffered, and these streams carry only a HEADER (under 100
 * bytes of msgpack). 4 KiB leaves room for any HEADER; a reader that
 * buffered a MEMORY record would hold its 8-byte offset plus RECORD_DATA and fail this.
 */
const RESUME_BUFFER_BOUND = 4096;
/** The largest reply frame of a 1 MiB REGION_READ: header + 16-byte fixed part + data. */
const REPLY_1M = maxFrameSizeFor(MiB);

const mib = (b: number): string => `${b >= 0 ? "+" : ""}${(b / MiB).toFixed(2)} MiB`;
type Gc = Awaited<ReturnType<ChildServer["gcStats"]>>;
const delta = (a: Gc, b: Gc): string =>
  `heapUsed ${mib(b.heapUsed - a.heapUsed)}, external ${mib(b.external - a.external)}, arrayBuffers ${mib(b.arrayBuffers - a.arrayBuffers)} (RSS ${mib(b.rss - a.rss)}, not asserted)`;

/** V8 memory after GC grew by at most `bound` (heap, external and arrayBuffers each). */
function expectV8Growth(a: Gc, b: Gc, bound: number, what: string): void {
  expect(b.heapUsed - a.heapUsed, `${what}: heapUsed`).toBeLessThan(bound);
  expect(b.external - a.external, `${what}: external`).toBeLessThan(bound);
  expect(b.arrayBuffers - a.arrayBuffers, `${what}: arrayBuffers`).toBeLessThan(bound);
}

/** Waits until the server serves a new client (the previous one has been let go); throws after 5 s. */
async function serverFree(s: ChildServer): Promise<void> {
  for (let i = 0; ; i++) {
    try {
      expect(await healthProbe(s.socketPath)).toBe(VENDOR);
      return;
    } catch (err) {
      if (i >= 250) throw new Error(`the server did not let go of its last client within 5 s: ${(err as Error).message}`);
      await sleep(20);
    }
  }
}

/** The server's fd count once it has let go of every client and stopped changing (20 ms apart, 3 s at most). */
async function settledFds(s: ChildServer): Promise<number> {
  await serverFree(s);
  let last = s.fds();
  for (let i = 0; i < 150; i++) {
    await sleep(20);
    const n = s.fds();
    if (n === last) return n;
    last = n;
  }
  throw new Error(`the server's fd count did not settle (last ${last})`);
}

describe("memory a client can make the server hold", () => {
  // Back-pressure: a client that does not read its replies makes the
  // connection stop dispatching and the transport stop reading once the send
  // queue passes its high-water mark, so what the server holds is bounded.
  it(`64 unread 1 MiB replies: the send queue peaks above SEND_HIGH_WATER and at most one reply over it; V8 memory follows; all of it and the fds come back when the client goes`, async () => {
    const s = await server();
    const fds0 = await settledFds(s);
    const g0 = await s.gcStats();
    const deaf = new DeafClient(s.socketPath);
    const version = versionBody();
    expect(deaf.send(Command.VERSION, version)).toBe(true);
    for (let i = 0; i < 64; i++) expect(deaf.send(Command.REGION_READ, le().u64(0).u32(RegionIndex.BAR0).u32(MiB).buf)).toBe(true);
    // the queue fills until back-pressure stops it; then it must stay put
    for (let i = 0; (await s.serverStats()).sendQueueHighWater <= SEND_HIGH_WATER; i++) {
      if (i >= 250) throw new Error(`the send queue never passed SEND_HIGH_WATER: ${JSON.stringify(await s.serverStats())}`);
      await sleep(20);
    }
    await sleep(500);
    const st = await s.serverStats();
    const g1 = await s.gcStats();
    console.log(`64 unread 1 MiB replies: ${JSON.stringify(st)}; held: ${delta(g0, g1)}`);
    expect(st.sendQueueHighWater).toBeGreaterThan(SEND_HIGH_WATER);
    expect(st.sendQueueHighWater).toBeLessThanOrEqual(SEND_HIGH_WATER + REPLY_1M);
    expect(st.decoderHighWater).toBeLessThanOrEqual(HEADER_SIZE + version.length);
    // what is held is the queue, in external memory
    expectV8Growth(g0, g1, st.sendQueueHighWater + SLACK, "while the client does not read");
    deaf.close();
    expect(await settledFds(s)).toBe(fds0);
    const g2 = await s.gcStats();
    console.log(`after the deaf client left: ${delta(g0, g2)}`);
    expectV8Growth(g0, g2, SLACK, "after the client left");
  });

  /** Sends stream bytes in MIG_DATA_WRITEs of at most 512 KiB; the first errno that is not 0, or 0. */
  const WRITE_CHUNK = 512 * 1024;
  /** The largest MIG_DATA_WRITE frame writeStream sends: header, argsz + size, data. */
  const WRITE_FRAME = HEADER_SIZE + 8 + WRITE_CHUNK;
  async function writeStream(c: RawClient, bytes: Uint8Array): Promise<number> {
    for (let at = 0; at < bytes.length; at += WRITE_CHUNK) {
      const part = bytes.subarray(at, Math.min(bytes.length, at + WRITE_CHUNK));
      const e = await c.errno(Command.MIG_DATA_WRITE, Buffer.concat([le().u32(8 + part.length).u32(part.length).buf, part]));
      if (e !== 0) return e;
    }
    return 0;
  }

  it("RESUMING: MEMORY records for a device without memory are refused within the first record; the server held at most RESUME_BUFFER_BOUND, and V8 memory is back within SLACK after DEVICE_RESET", async () => {
    const s = await server();
    const c = await RawClient.ready(s.socketPath);
    expect(await c.errno(Command.DEVICE_FEATURE, migSet(MigState.RESUMING))).toBe(0);
    const w = new StateStreamWriter();
    w.header({ deviceType: "edu", deviceVersion: 1, configSize: 256 });
    const data = Buffer.alloc(RECORD_DATA, 0xab);
    const g0 = await s.gcStats();
    let refusedAt = -1;
    for (let i = 0; i < 96 && refusedAt < 0; i++) {
      w.memory(BigInt(i) * BigInt(MiB), data);
      for (const seg of w.readSegments(1 << 30)) {
        if ((await writeStream(c, seg)) !== 0) {
          refusedAt = i;
          break;
        }
      }
    }
    const st = await s.serverStats();
    const g1 = await s.gcStats();
    console.log(`RESUMING, MEMORY records for edu: refused at record ${refusedAt}; ${JSON.stringify(st)}; ${delta(g0, g1)}`);
    expect(refusedAt).toBe(0);
    expect(st.resumeBufferHighWater).toBeLessThanOrEqual(RESUME_BUFFER_BOUND);
    expect(st.decoderHighWater).toBeLessThanOrEqual(WRITE_FRAME);
    // refused at the record header: nothing of the record is held
    expectV8Growth(g0, g1, SLACK, "after the refusal");
    // the device recovers with a reset, and works
    expect(await c.errno(Command.DEVICE_RESET)).toBe(0);
    expect(await c.vendorId()).toBe(VENDOR);
    const g2 = await s.gcStats();
    expectV8Growth(g0, g2, SLACK, "after DEVICE_RESET");
    c.close();
  });

  // Whatever a resuming client streams, the server holds at most RESUME_BUFFER_BOUND of it
  // beyond device memory (allocated with the device, before the baseline).
  it("RESUMING (bigmem 8 MiB): 128 MiB of MEMORY records, accepted; the server held at most RESUME_BUFFER_BOUND of them at once, and V8 memory is back within SLACK", async () => {
    const s = await server({ device: "bigmem", deviceOpts: ["size=8M"] });
    const c = await RawClient.ready(s.socketPath);
    expect(await c.errno(Command.DEVICE_FEATURE, migSet(MigState.RESUMING))).toBe(0);
    const w = new StateStreamWriter();
    w.header({ deviceType: "bigmem", deviceVersion: BIGMEM_STATE_VERSION, configSize: 256 });
    const g0 = await s.gcStats();
    // the same 8 MiB of device memory, 16 times over: 128 MiB of stream
    const data = Buffer.alloc(RECORD_DATA, 0x5c);
    for (let i = 0; i < 128; i++) {
      w.memory(BigInt(i % 8) * BigInt(MiB), data);
      for (const seg of w.readSegments(1 << 30)) expect(await writeStream(c, seg)).toBe(0);
    }
    const st = await s.serverStats();
    const g1 = await s.gcStats();
    console.log(`RESUMING bigmem: 128 MiB of MEMORY records for 8 MiB of memory: ${JSON.stringify(st)}; ${delta(g0, g1)}`);
    expect(st.resumeBufferHighWater).toBeLessThanOrEqual(RESUME_BUFFER_BOUND);
    expect(st.decoderHighWater).toBeLessThanOrEqual(WRITE_FRAME);
    expectV8Growth(g0, g1, SLACK, "after 128 MiB of stream");
    c.close();
  });
});

describe("fds the server writes to", () => {
  const dir = tmpDir("vfu-fifo-");
  afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

  it("a FIFO offered as an interrupt eventfd is refused (it would block the server once full)", async () => {
    const s = await server();
    const fifo = path.join(dir, "irq.fifo");
    execFileSync("mkfifo", [fifo]);
    const fd = fs.openSync(fifo, fs.constants.O_RDWR); // blocking, and nobody drains it
    const c = await RawClient.ready(s.socketPath);
    expect(await c.errno(Command.DEVICE_SET_IRQS, setIrqs(IrqSetFlags.ACTION_TRIGGER | IrqSetFlags.DATA_EVENTFD, IrqIndex.MSI, 1), { fds: [fd] })).toBe(22);
    fs.closeSync(fd);
    // 10,000 loopback triggers (a pipe's 64 KiB would have filled after 8,192): the server answers throughout
    const e = eventfd();
    expect(await c.errno(Command.DEVICE_SET_IRQS, setIrqs(IrqSetFlags.ACTION_TRIGGER | IrqSetFlags.DATA_EVENTFD, IrqIndex.MSI, 1), { fds: [e] })).toBe(0);
    native.close(e);
    for (let i = 0; i < 10_000; i++) c.send(Command.DEVICE_SET_IRQS, setIrqs(IrqSetFlags.ACTION_TRIGGER | IrqSetFlags.DATA_NONE, IrqIndex.MSI, 1), { flags: 1 << 4 });
    expect(await c.vendorId()).toBe(VENDOR);
    c.close();
    expect(await healthProbe(s.socketPath)).toBe(VENDOR);
  });
});

describe("device registers that stall the server", () => {
  // edu's factorial register once looped n times on the event loop: writing
  // 0xffffffff stalled the whole server (found by the fuzzer). n! mod 2^32 is
  // 0 for every n >= 34, so the device answers at once. Judged by the CPU
  // time the server spends (from /proc, immune to a loaded machine), not by
  // wall time: 2^32 loop steps cost seconds of CPU anywhere; the write, the
  // computation and the reads cost milliseconds.
  it("factorial of 0xffffffff: the register reads 0 (34! and up wrap to 0) and the server spent under 1 s of CPU on it", async () => {
    const s = await server();
    const c = await RawClient.ready(s.socketPath);
    // replies may take as long as a stalled server needs: the verdict is the CPU time, not a timeout
    const read32 = async (offset: bigint): Promise<number> => {
      const r = await c.request(Command.REGION_READ, le().u64(offset).u32(RegionIndex.BAR0).u32(4).buf, {}, 60_000);
      expect(r.header.error).toBe(0);
      return r.body.readUInt32LE(16);
    };
    const cpu0 = cpuTicks(s.pid);
    await c.write(RegionIndex.BAR0, 0x08n, le().u32(0xffffffff).buf);
    // the computation runs after the write is answered: a later read of the status and the register sees it done
    await waitUntilAsync(async () => ((await read32(0x20n)) & 1) === 0, "the factorial to complete (status bit 0 clear)", 60_000);
    expect(await read32(0x08n)).toBe(0);
    const used = cpuTicks(s.pid) - cpu0;
    console.log(`factorial(0xffffffff): server CPU ${used} ticks (${CLOCK_TICKS}/s)`);
    expect(used).toBeLessThan(CLOCK_TICKS);
    c.close();
  }, 90_000);
});

/** Clock ticks per second of /proc/PID/stat's utime and stime (USER_HZ: 100 on Linux). */
const CLOCK_TICKS = 100;

/** CPU time of a process so far, user + system, in clock ticks. */
function cpuTicks(pid: number): number {
  const f = fs.readFileSync(`/proc/${pid}/stat`, "latin1").split(") ")[1]!.split(" ");
  return Number(f[11]) + Number(f[12]);
}

/** Polls an async predicate every 10 ms; throws after timeoutMs, saying what it waited for. */
async function waitUntilAsync(pred: () => Promise<boolean>, what: string, timeoutMs: number): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!(await pred())) {
    if (Date.now() > end) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(10);
  }
}

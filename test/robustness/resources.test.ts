/**
 * Hostile use of resources, against servers in child processes (a stalled
 * or ballooning server must not take the test runner with it): memory a
 * client can make the server hold, fds that block the server when it writes
 * to them, device registers that stall the event loop.
 */
import { BIGMEM_STATE_VERSION } from "../../devices/bigmem/bigmem.ts";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { afterAll, afterEach, describe, expect, it } from "vitest";
import { Command, Feature, FeatureFlags, IrqIndex, IrqSetFlags, MigState, RegionIndex } from "../../protocol/index.ts";
import { StateStreamWriter } from "../../src/migration/state-stream.ts";
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

describe("memory a client can make the server hold", () => {
  // Back-pressure: a client that does not read its replies makes the
  // connection stop dispatching and the transport stop reading once the send
  // queue passes its high-water mark, so what the server holds is bounded.
  it("64 unread 1 MiB replies: the server holds less than 24 MiB for them", async () => {
    const s = await server();
    const rss0 = await s.gcRss();
    const deaf = new DeafClient(s.socketPath);
    deaf.send(Command.VERSION, versionBody());
    for (let i = 0; i < 64; i++) deaf.send(Command.REGION_READ, le().u64(0).u32(RegionIndex.BAR0).u32(MiB).buf);
    await sleep(500);
    const rss1 = await s.gcRss();
    console.log(`64 unread 1 MiB replies: server RSS +${((rss1 - rss0) / MiB).toFixed(1)} MiB`);
    deaf.close();
    expect(rss1 - rss0).toBeLessThan(24 * MiB);
  });

  /** Sends stream bytes in MIG_DATA_WRITEs of at most 512 KiB; the first errno that is not 0, or 0. */
  async function writeStream(c: RawClient, bytes: Uint8Array): Promise<number> {
    for (let at = 0; at < bytes.length; at += 512 * 1024) {
      const part = bytes.subarray(at, Math.min(bytes.length, at + 512 * 1024));
      const e = await c.errno(Command.MIG_DATA_WRITE, Buffer.concat([le().u32(8 + part.length).u32(part.length).buf, part]));
      if (e !== 0) return e;
    }
    return 0;
  }

  it("RESUMING: MEMORY records for a device without memory are refused at once, not staged", async () => {
    const s = await server();
    const c = await RawClient.ready(s.socketPath);
    expect(await c.errno(Command.DEVICE_FEATURE, migSet(MigState.RESUMING))).toBe(0);
    const w = new StateStreamWriter();
    w.header({ deviceType: "edu", deviceVersion: 1, configSize: 256 });
    const data = Buffer.alloc(MiB - 64, 0xab);
    const rss0 = await s.gcRss();
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
    const rss1 = await s.gcRss();
    console.log(`RESUMING, MEMORY records for edu: refused at record ${refusedAt}; server RSS +${((rss1 - rss0) / MiB).toFixed(1)} MiB`);
    expect(refusedAt).toBe(0);
    expect(rss1 - rss0).toBeLessThan(16 * MiB);
    // the device recovers with a reset, and works
    expect(await c.errno(Command.DEVICE_RESET)).toBe(0);
    expect(await c.vendorId()).toBe(VENDOR);
    c.close();
  });

  // Resume writes MEMORY records into device memory as they arrive (commit 6320208), so what a
  // client streams into RESUMING costs the server at most the device's memory, however much it sends.
  it("RESUMING (bigmem 8 MiB): 128 MiB of MEMORY records cost the server at most its 8 MiB of memory", async () => {
    const s = await server({ device: "bigmem", deviceOpts: ["size=8M"] });
    const c = await RawClient.ready(s.socketPath);
    expect(await c.errno(Command.DEVICE_FEATURE, migSet(MigState.RESUMING))).toBe(0);
    const w = new StateStreamWriter();
    w.header({ deviceType: "bigmem", deviceVersion: BIGMEM_STATE_VERSION, configSize: 256 });
    const rss0 = await s.gcRss();
    // the same 8 MiB of device memory, 16 times over: 128 MiB of stream
    const data = Buffer.alloc(MiB, 0x5c);
    for (let i = 0; i < 128; i++) {
      w.memory(BigInt(i % 8) * BigInt(MiB), data);
      for (const seg of w.readSegments(1 << 30)) expect(await writeStream(c, seg)).toBe(0);
    }
    const rss1 = await s.gcRss();
    console.log(`RESUMING bigmem: 128 MiB of MEMORY records for 8 MiB of memory: server RSS +${((rss1 - rss0) / MiB).toFixed(1)} MiB`);
    expect(rss1 - rss0).toBeLessThan(48 * MiB);
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
  // 0 for every n >= 34, so the device answers at once.
  it("factorial of 0xffffffff: the server still answers within 1 s", async () => {
    const s = await server();
    const c = await RawClient.ready(s.socketPath);
    await c.write(RegionIndex.BAR0, 0x08n, le().u32(0xffffffff).buf);
    c.close();
    await sleep(50);
    const t0 = Date.now();
    const vendor = await healthProbe(s.socketPath, 1000).catch(() => -1);
    console.log(`factorial(0xffffffff): probe ${vendor === VENDOR ? "answered" : "timed out"} after ${Date.now() - t0} ms`);
    expect(vendor).toBe(VENDOR);
  });
});

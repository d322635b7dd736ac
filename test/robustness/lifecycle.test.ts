/**
 * Lifecycle: a client that goes away at any point takes its fds and
 * mappings with it (counted in the server process's /proc/PID/fd and maps),
 * leaves the device state alone (a value written before reads back), and
 * leaves no migration behind; the next client finds a working device. The
 * CLI exits 0 on SIGTERM / SIGINT and removes its socket; the socket is
 * 0600 by default; a stale socket left by a SIGKILLed run is taken over.
 */
import { spawn } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  Command,
  DmaMapFlags,
  Feature,
  FeatureFlags,
  IrqIndex,
  IrqSetFlags,
  MigState,
  RegionIndex,
} from "../../protocol/index.ts";
import { native } from "../../src/transport/native.ts";
import {
  CLI,
  ChildServer,
  DeafClient,
  RawClient,
  ROOT,
  eventfd,
  eventually,
  frameBytes,
  healthProbe,
  isAlive,
  le,
  memfd,
  memfdMappings,
  sleep,
  tmpDir,
  versionBody,
} from "./raw-client.ts";

const VENDOR = 0x1234;

const dmaMap = (address: bigint, size: bigint, offset = 0n): Buffer =>
  le().u32(32).u32(DmaMapFlags.READ | DmaMapFlags.WRITE).u64(offset).u64(address).u64(size).buf;
const setIrqs = (index: number, count: number): Buffer =>
  le().u32(20).u32(IrqSetFlags.ACTION_TRIGGER | IrqSetFlags.DATA_EVENTFD).u32(index).u32(0).u32(count).buf;
const migSetBody = (state: number): Buffer =>
  le().u32(16).u32(Feature.MIG_DEVICE_STATE | FeatureFlags.SET).u32(state).s32(-1).buf;
const migGetBody = (): Buffer => le().u32(16).u32(Feature.MIG_DEVICE_STATE | FeatureFlags.GET).buf;

async function migSet(c: RawClient, state: number): Promise<void> {
  expect(await c.errno(Command.DEVICE_FEATURE, migSetBody(state))).toBe(0);
}
async function migGet(c: RawClient): Promise<number> {
  const r = await c.request(Command.DEVICE_FEATURE, migGetBody());
  expect(r.header.error).toBe(0);
  return r.body.readUInt32LE(8);
}
async function migRead(c: RawClient, size: number): Promise<number> {
  const r = await c.request(Command.MIG_DATA_READ, le().u32(8 + size).u32(size).buf);
  expect(r.header.error).toBe(0);
  return r.body.readUInt32LE(4);
}

/** Waits until the server's fd count is back to `baseline` (the connection teardown runs after EOF). */
async function expectFdsBack(s: ChildServer, baseline: number): Promise<void> {
  const ok = await eventually(() => s.fds() === baseline, 3000);
  if (!ok) expect(s.fdTargets(), `server fds: expected ${baseline}`).toHaveLength(baseline);
}

describe("a client that disconnects at any point (edu, child process)", () => {
  let s: ChildServer;
  let baseline = 0;
  const DMA_SRC = 0x80n;
  let marker = 0x5a5a0000n;

  beforeAll(async () => {
    s = await ChildServer.start();
    expect(await healthProbe(s.socketPath)).toBe(VENDOR);
    await sleep(50);
    baseline = s.fds();
  });
  afterAll(() => s?.stop());

  async function withMarker(): Promise<RawClient> {
    const c = await RawClient.ready(s.socketPath);
    marker++;
    await c.write(RegionIndex.BAR0, DMA_SRC, le().u64(marker).buf);
    return c;
  }
  async function expectDeviceKept(): Promise<void> {
    const c = await RawClient.ready(s.socketPath);
    try {
      expect(await c.vendorId()).toBe(VENDOR);
      expect((await c.read(RegionIndex.BAR0, DMA_SRC, 8)).readBigUInt64LE(0)).toBe(marker);
      expect(await migGet(c)).toBe(MigState.RUNNING);
    } finally {
      c.close();
      await c.waitClosed();
    }
    await expectFdsBack(s, baseline);
  }

  it("before VERSION, right after connecting", async () => {
    const c = RawClient.connect(s.socketPath);
    await sleep(10);
    c.close();
    await expectFdsBack(s, baseline);
    expect(await healthProbe(s.socketPath)).toBe(VENDOR);
  });

  it("mid-frame (header sent, body not)", async () => {
    const c = await withMarker();
    c.sendRaw(frameBytes({ msgId: 9, command: Command.REGION_WRITE, flags: 0, error: 0 }, le().u64(DMA_SRC).u32(0).u32(8).u64(1).buf).subarray(0, 20));
    await sleep(10);
    c.close();
    await expectFdsBack(s, baseline);
    await expectDeviceKept();
  });

  it("after DMA_MAP with memfds: fds and mappings released", async () => {
    const c = await withMarker();
    const name = `robust-life-${process.pid}-map`;
    for (let i = 0; i < 3; i++) {
      const fd = memfd(name, 1n << 20n);
      expect(await c.errno(Command.DMA_MAP, dmaMap(BigInt(i) << 24n, 1n << 20n), { fds: [fd] })).toBe(0);
      native.close(fd);
    }
    expect(memfdMappings(s.pid, name)).toBe(3);
    c.close();
    await expectFdsBack(s, baseline);
    expect(await eventually(() => memfdMappings(s.pid, name) === 0, 3000)).toBe(true);
    await expectDeviceKept();
  });

  it("after SET_IRQS with eventfds (INTx and MSI): the eventfds are closed", async () => {
    const c = await withMarker();
    for (const index of [IrqIndex.INTX, IrqIndex.MSI]) {
      const fd = eventfd();
      expect(await c.errno(Command.DEVICE_SET_IRQS, setIrqs(index, 1), { fds: [fd] })).toBe(0);
      native.close(fd);
    }
    expect(s.fds()).toBe(baseline + 1 /* socket */ + 2);
    c.close();
    await expectFdsBack(s, baseline);
    await expectDeviceKept();
  });

  it("with replies still queued (a deaf client that never reads)", async () => {
    const c = new DeafClient(s.socketPath);
    c.send(Command.VERSION, versionBody());
    for (let i = 0; i < 32; i++) c.send(Command.REGION_READ, le().u64(0).u32(RegionIndex.BAR0).u32(1 << 20).buf);
    const fd = eventfd();
    c.send(Command.DEVICE_SET_IRQS, setIrqs(IrqIndex.MSI, 1), [fd]);
    native.close(fd);
    await sleep(100);
    c.close();
    await expectFdsBack(s, baseline);
    await expectDeviceKept();
  });

  it("in the middle of PRE_COPY: the device runs again, state kept", async () => {
    const c = await withMarker();
    await migSet(c, MigState.PRE_COPY);
    await migRead(c, 64);
    c.close();
    await expectFdsBack(s, baseline);
    await expectDeviceKept();
  });

  it("in the middle of STOP_COPY: the device runs again, state kept", async () => {
    const c = await withMarker();
    await migSet(c, MigState.STOP_COPY);
    await migRead(c, 16);
    c.close();
    await expectFdsBack(s, baseline);
    await expectDeviceKept();
  });

  it("in the middle of RESUMING: aborted, and abort is reset: the device runs again at power-on", async () => {
    const c = await withMarker();
    await migSet(c, MigState.RESUMING);
    expect(await c.errno(Command.MIG_DATA_WRITE, le().u32(16).u32(8).bytes(Buffer.from("VUDS\x01\x00\x00\x00", "latin1")).buf)).toBe(0);
    c.close();
    await expectFdsBack(s, baseline);
    const d = await RawClient.ready(s.socketPath);
    try {
      expect(await d.vendorId()).toBe(VENDOR);
      expect((await d.read(RegionIndex.BAR0, DMA_SRC, 8)).readBigUInt64LE(0)).toBe(0n);
      expect(await migGet(d)).toBe(MigState.RUNNING);
    } finally {
      d.close();
      await d.waitClosed();
    }
    await expectFdsBack(s, baseline);
  });
});

describe("mid-migration disconnect with device memory (bigmem, child process)", () => {
  let s: ChildServer;
  let baseline = 0;
  const BAR2 = RegionIndex.BAR2;

  beforeAll(async () => {
    s = await ChildServer.start({ device: "bigmem", deviceOpts: ["size=8M"] });
    expect(await healthProbe(s.socketPath)).toBe(VENDOR);
    await sleep(50);
    baseline = s.fds();
  });
  afterAll(() => s?.stop());

  for (const [label, state] of [
    ["PRE_COPY", MigState.PRE_COPY],
    ["STOP_COPY", MigState.STOP_COPY],
  ] as const) {
    it(`${label}: stream half read, DMA maps and eventfds held, then the client vanishes`, async () => {
      const c = await RawClient.ready(s.socketPath);
      const mark = Buffer.from(`marker-${label}-${Date.now()}`);
      await c.write(BAR2, 0x12340n, mark);
      const name = `robust-life-${process.pid}-${label}`;
      const mfd = memfd(name, 1n << 20n);
      expect(await c.errno(Command.DMA_MAP, dmaMap(0n, 1n << 20n), { fds: [mfd] })).toBe(0);
      native.close(mfd);
      const efd = eventfd();
      expect(await c.errno(Command.DEVICE_SET_IRQS, setIrqs(IrqIndex.MSI, 1), { fds: [efd] })).toBe(0);
      native.close(efd);
      await migSet(c, state);
      let got = 0;
      for (let i = 0; i < 4; i++) got += await migRead(c, 256 * 1024);
      expect(got).toBeGreaterThan(0);
      c.close();
      await expectFdsBack(s, baseline);
      expect(await eventually(() => memfdMappings(s.pid, name) === 0, 3000)).toBe(true);

      const d = await RawClient.ready(s.socketPath);
      expect(await d.vendorId()).toBe(VENDOR);
      expect((await d.read(BAR2, 0x12340n, mark.length)).equals(mark)).toBe(true);
      expect(await migGet(d)).toBe(MigState.RUNNING);
      // and a migration can start over from scratch
      await migSet(d, MigState.PRE_COPY);
      expect(await migRead(d, 4096)).toBeGreaterThan(0);
      await migSet(d, MigState.RUNNING);
      d.close();
      await d.waitClosed();
      await expectFdsBack(s, baseline);
    });
  }
});

// ------------------------------------------------------------------ the CLI

interface Cli {
  proc: ReturnType<typeof spawn>;
  out: string;
  exit: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

function startCli(socket: string, extra: string[] = []): Cli {
  const proc = spawn(process.execPath, [CLI, "serve", "--socket", socket, "--log-format", "json", "--log-level", "warn", ...extra], {
    cwd: ROOT,
    stdio: ["ignore", "pipe", "pipe"],
  });
  const cli: Cli = {
    proc,
    out: "",
    exit: new Promise((resolve) => proc.on("exit", (code, signal) => resolve({ code, signal }))),
  };
  proc.stdout!.on("data", (b: Buffer) => (cli.out += b.toString()));
  proc.stderr!.on("data", (b: Buffer) => (cli.out += b.toString()));
  return cli;
}

async function cliReady(cli: Cli, socket: string): Promise<void> {
  const ok = await eventually(() => cli.out.includes("serving") && fs.existsSync(socket), 20_000, 20);
  if (!ok) throw new Error(`CLI did not come up: ${cli.out}`);
}

describe("the CLI process", () => {
  const dir = tmpDir("vfu-cli-");
  afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

  for (const signal of ["SIGTERM", "SIGINT"] as const) {
    it(`${signal} with a client attached: exit 0, socket removed`, async () => {
      const sock = path.join(dir, `${signal}.sock`);
      const cli = startCli(sock);
      await cliReady(cli, sock);
      expect(fs.statSync(sock).mode & 0o777).toBe(0o600);
      const c = await RawClient.ready(sock);
      expect(await c.vendorId()).toBe(VENDOR);
      cli.proc.kill(signal);
      const { code } = await cli.exit;
      expect(code, cli.out).toBe(0);
      expect(fs.existsSync(sock)).toBe(false);
      await c.waitClosed(3000);
    });
  }

  it("--socket-mode 0660 is applied", async () => {
    const sock = path.join(dir, "mode.sock");
    const cli = startCli(sock, ["--socket-mode", "0660"]);
    await cliReady(cli, sock);
    expect(fs.statSync(sock).mode & 0o777).toBe(0o660);
    cli.proc.kill("SIGTERM");
    expect((await cli.exit).code).toBe(0);
  });

  it("a stale socket left by a SIGKILLed server is taken over; a live one is not", async () => {
    const sock = path.join(dir, "stale.sock");
    const first = startCli(sock);
    await cliReady(first, sock);
    expect(await healthProbe(sock)).toBe(VENDOR);
    // a second server on a live socket refuses to start (exit 2) and leaves the first alone
    const rival = startCli(sock);
    const rivalExit = await rival.exit;
    expect(rivalExit.code).toBe(2);
    expect(rival.out).toMatch(/another server is listening/);
    expect(await healthProbe(sock)).toBe(VENDOR);

    first.proc.kill("SIGKILL");
    await first.exit;
    expect(fs.existsSync(sock)).toBe(true); // the crash left it behind
    const second = startCli(sock);
    await cliReady(second, sock);
    expect(await healthProbe(sock)).toBe(VENDOR);
    second.proc.kill("SIGTERM");
    expect((await second.exit).code).toBe(0);
    expect(fs.existsSync(sock)).toBe(false);
  });

  it("a stale socket left by a SIGKILLed child server while a client was attached", async () => {
    const sock = path.join(dir, "stale2.sock");
    const a = await ChildServer.start({ socketPath: sock });
    const c = await RawClient.ready(sock);
    await a.kill("SIGKILL");
    expect(isAlive(a.pid)).toBe(false);
    await c.waitClosed(3000);
    const b = await ChildServer.start({ socketPath: sock });
    expect(await healthProbe(sock)).toBe(VENDOR);
    await b.stop();
    await a.stop();
  });
});

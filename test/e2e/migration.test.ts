/**
 * Live migration between two `vfio-user-ts serve` processes, driven by the
 * TypeScript client: the demo (bigmem with a live workload, then equality at
 * switch-over and the device working on the destination), and the failure
 * paths: cancel during pre-copy, a stream corrupted in transit (in pre-copy
 * and in stop-copy), the client vanishing in PRE_COPY, and an edu stream fed
 * to bigmem.
 */
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { Errno, MigState } from "../../protocol/constants.ts";
import { VfioUserError } from "../../protocol/errors.ts";
import { ConnectionClosedError, VfioUserClient } from "../../src/client/client.ts";
import { GuestMemory } from "../../src/client/guest-memory.ts";
import { MigrationCancelledError, MigrationDriver, MigrationError, type MigrationDriverOptions } from "../../src/client/migration-driver.ts";
import {
  BigmemGuest,
  checkDeviceWorks,
  checksumByReads,
  RAM_IOVA,
  runDemoMigrate,
  spawnServer,
  Workload,
  type ServerProcess,
} from "../../src/cli/demo-migrate.ts";
import { snapshotRestore, snapshotSave, SnapshotError } from "../../src/cli/snapshot.ts";

const RAM = 8n << 20n;
const CLI = fileURLToPath(new URL("../../src/cli/vfio-user-ts.mjs", import.meta.url));

describe("demo migrate", () => {
  it("migrates a 32 MiB bigmem under a live workload and verifies the destination", async () => {
    const lines: string[] = [];
    const r = await runDemoMigrate({ size: "32M", ram: 16n << 20n, print: (l) => lines.push(l) });
    expect(r.error, lines.join("\n")).toBeUndefined();
    expect(r.checks.map((c) => c.name)).toEqual([
      "registers",
      "config space",
      "guest RAM",
      "device memory spot reads",
      "device memory checksum",
      "destination device works",
    ]);
    for (const c of r.checks) expect(c.ok, `${c.name}: ${c.detail}`).toBe(true);
    expect(r.ok).toBe(true);
    const m = r.migration!;
    expect(m.rounds.length).toBeGreaterThanOrEqual(1);
    expect(m.rounds[0]!.initialBytes).toBeGreaterThanOrEqual(32n << 20n);
    expect(m.deviceBytes).toBeGreaterThan(32 << 20);
    expect(m.guestFullCopyPages).toBe(Number((16n << 20n) / 4096n));
    expect(r.workload!.ops).toBeGreaterThan(0);
    expect(m.downtimeMs).toBeGreaterThan(0);
    expect(lines.join("\n")).toContain("migration verified");
  }, 60_000);

  it("uses PRE_COPY_P2P and RUNNING_P2P when the servers offer P2P", async () => {
    const lines: string[] = [];
    const r = await runDemoMigrate({ size: "16M", ram: 8n << 20n, p2p: true, print: (l) => lines.push(l) });
    expect(r.ok, lines.join("\n")).toBe(true);
    expect(r.migration!.p2p).toBe(true);
    expect(r.migration!.attach.source.p2p).toBe(true);
  }, 60_000);

  it("migrates the default 256 MiB device (the wall time is reported, not asserted)", async () => {
    const t = performance.now();
    const lines: string[] = [];
    const r = await runDemoMigrate({ print: (l) => lines.push(l) });
    const wallMs = performance.now() - t;
    expect(r.ok, lines.join("\n")).toBe(true);
    expect(r.deviceSize).toBe(256n << 20n);
    for (const c of r.checks) expect(c.ok, `${c.name}: ${c.detail}`).toBe(true);
    console.log(`[e2e migration] demo migrate of the default 256 MiB bigmem: ${(wallMs / 1000).toFixed(1)} s wall, downtime ${r.migration?.downtimeMs ?? "?"} ms`);
  }, 120_000);
});

// ---------------------------------------------------------------------------
// Failure paths, on one pair of bigmem servers and one edu server
// ---------------------------------------------------------------------------

let dir: string;
let srcServer: ServerProcess;
let dstServer: ServerProcess;
let eduServer: ServerProcess;
const open: { client: VfioUserClient; ram: GuestMemory; guest: BigmemGuest }[] = [];

/** Connects, retrying while the server is still dropping the previous client (one client at a time). */
async function connect(socket: string): Promise<VfioUserClient> {
  const deadline = Date.now() + 5000;
  for (;;) {
    const c = await VfioUserClient.connect(socket, { connectTimeoutMs: 2000, requestTimeoutMs: 10_000 });
    try {
      await c.negotiate();
      return c;
    } catch (err) {
      c.close();
      if (!(err instanceof ConnectionClosedError) || Date.now() > deadline) throw err;
      await new Promise((r) => setTimeout(r, 20));
    }
  }
}

/** A guest on a server: client, RAM mapped, device enabled, MSI wired. Resets the device first unless told not to. */
async function attachGuest(server: ServerProcess, opts: { reset?: boolean; enable?: boolean } = {}): Promise<BigmemGuest> {
  const client = await connect(server.socket);
  if (opts.reset ?? true) await client.reset();
  const ram = GuestMemory.create(RAM, { iova: RAM_IOVA });
  const guest = new BigmemGuest(client, ram);
  open.push({ client, ram, guest });
  await guest.probe({ enable: opts.enable ?? true });
  if (opts.enable ?? true) await guest.wireMsi();
  return guest;
}

function closeAll(): void {
  for (const o of open.splice(0)) {
    o.guest.close();
    o.client.close();
    o.ram.close();
  }
}

function sides(src: BigmemGuest, dst: BigmemGuest): [{ client: VfioUserClient; ram: GuestMemory }, { client: VfioUserClient; ram: GuestMemory }] {
  return [
    { client: src.client, ram: src.ram },
    { client: dst.client, ram: dst.ram },
  ];
}

async function settle<T>(p: Promise<T>): Promise<unknown> {
  return p.then(
    () => null,
    (e: unknown) => e,
  );
}

describe("failure paths", () => {
  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), "vfio-migration-e2e-"));
    const bigmem = { dir, device: "bigmem", deviceOptions: ["size=32M"] };
    [srcServer, dstServer, eduServer] = await Promise.all([
      spawnServer({ ...bigmem, name: "src" }),
      spawnServer({ ...bigmem, name: "dst" }),
      spawnServer({ dir, name: "edu", device: "edu" }),
    ]);
  }, 60_000);

  afterEach(async () => {
    closeAll();
    // let the servers notice before the next test connects
    await new Promise((r) => setTimeout(r, 20));
  });

  afterAll(async () => {
    closeAll();
    await Promise.all([srcServer?.stop(), dstServer?.stop(), eduServer?.stop()]);
    rmSync(dir, { recursive: true, force: true });
  });

  it("QEMU's way out of RESUMING (one request to RUNNING, no STOP): the destination has the source's memory and registers and runs", async () => {
    const src = await attachGuest(srcServer);
    const dst = await attachGuest(dstServer, { enable: false });
    await src.fillFromGuest();
    const sum = await src.checksum();
    const regs = await src.registers();
    const driver = new MigrationDriver(...sides(src, dst), { destinationResume: "direct" });
    const m = await driver.run();
    expect(await dst.client.getMigState()).toBe(MigState.RUNNING);
    expect(await dst.checksum()).toBe(sum);
    // the registers as the source left them (the checksum run above included)
    const after = await dst.registers();
    for (const [k, v] of regs) if (!/csum|irq/i.test(k)) expect([k, after.get(k)]).toEqual([k, v]);
    const works = await checkDeviceWorks(dst, "destination");
    expect(works.ok, works.detail).toBe(true);
    expect(m.downtime.loadMs).toBeGreaterThanOrEqual(0);
  });

  it("cancel during pre-copy returns the source to RUNNING with nothing lost", async () => {
    const src = await attachGuest(srcServer);
    const dst = await attachGuest(dstServer, { enable: false });
    await src.fillFromGuest();
    const workload = new Workload(src);
    workload.start();
    let before = 0;
    let regsBefore = new Map<string, number>();
    let cancelled: Promise<boolean> | null = null;
    // threshold 0: pre-copy would go on while the workload dirties memory; after round 1 the VM
    // stops, the state is noted (the device still runs in PRE_COPY) and the migration is cancelled
    const driver: MigrationDriver = new MigrationDriver(...sides(src, dst), {
      thresholdBytes: 0,
      maxRounds: 50,
      onRound: async () => {
        if (cancelled) return;
        await workload.stop();
        expect(driver.currentPhase).toBe("precopy");
        expect(await src.client.getMigState()).toBe(MigState.PRE_COPY);
        before = await src.checksum();
        regsBefore = await src.registers();
        cancelled = driver.cancel();
      },
    });
    const err = await settle(driver.run());
    expect(await cancelled).toBe(true);
    expect(err).toBeInstanceOf(MigrationCancelledError);
    expect((err as MigrationError).sourceState).toBe(MigState.RUNNING);
    expect((err as MigrationError).destinationState).toBe(MigState.RUNNING);
    expect(await src.client.getMigState()).toBe(MigState.RUNNING);
    // logging stopped
    const report = await settle(src.client.dmaLoggingReport(RAM_IOVA, RAM, 4096n));
    expect((report as VfioUserError).errno).toBe(Errno.EINVAL);
    // nothing lost, and the device still works
    expect(await src.registers()).toEqual(regsBefore);
    expect(await src.checksum()).toBe(before);
    expect(await checksumByReads(src)).toBe(before);
    const works = await checkDeviceWorks(src, "source");
    expect(works.ok, works.detail).toBe(true);
    expect(await driver.cancel()).toBe(false);
  });

  for (const when of ["precopy", "stop-copy"] as const) {
    it(`a stream corrupted in transit during ${when} is refused (EINVAL) and the source runs on`, async () => {
      const src = await attachGuest(srcServer);
      const dst = await attachGuest(dstServer, { enable: false });
      await src.fillFromGuest();
      const workload = new Workload(src);
      workload.start();
      let flipped = -1;
      let driver!: MigrationDriver;
      const opts: MigrationDriverOptions = {
        stopVm: () => workload.stop(),
        resumeVm: async () => workload.start(),
        streamFilter: (chunk, offset) => {
          const target = when === "precopy" ? 3 << 20 : -1;
          const hit = when === "precopy" ? target >= offset && target < offset + chunk.length : driver.currentPhase === "stop-copy" && flipped < 0;
          if (!hit || chunk.length === 0) return chunk;
          const at = when === "precopy" ? target - offset : chunk.length - 5; // stop-copy: near the end of its first chunk
          const copy = Buffer.from(chunk);
          copy[at]! ^= 0x01;
          flipped = offset + at;
          return copy;
        },
      };
      driver = new MigrationDriver(...sides(src, dst), opts);
      const err = await settle(driver.run());
      expect(flipped).toBeGreaterThanOrEqual(0);
      expect(err).toBeInstanceOf(MigrationError);
      const e = err as MigrationError;
      expect(e.side).toBe("destination");
      expect(e.errno).toBe(Errno.EINVAL);
      expect(e.message).toContain("RESUMING -> STOP");
      expect(e.phase).toBe(when);
      expect(e.sourceState).toBe(MigState.RUNNING);
      expect(e.destinationState).toBe(MigState.RUNNING); // reset after the refusal
      expect(await src.client.getMigState()).toBe(MigState.RUNNING);
      // the workload goes on (resumed after a stop-copy failure) against the source
      const ops = workload.stats.ops;
      await new Promise((r) => setTimeout(r, 100));
      expect(workload.stats.ops).toBeGreaterThan(ops);
      await workload.stop();
      const works = await checkDeviceWorks(src, "source");
      expect(works.ok, works.detail).toBe(true);
    });
  }

  it("the client vanishing in PRE_COPY leaves the source server running with its device state", async () => {
    const src = await attachGuest(srcServer);
    const dst = await attachGuest(dstServer, { enable: false });
    await src.fillFromGuest();
    const before = await src.checksum();
    const regsBefore = await src.registers();
    const driver = new MigrationDriver(...sides(src, dst), {
      thresholdBytes: 0,
      maxRounds: 50,
      onRound: () => src.client.close(),
    });
    const err = await settle(driver.run());
    expect(err).toBeInstanceOf(MigrationError);
    expect((err as MigrationError).side).toBe("source");
    expect((err as MigrationError).sourceState).toBeUndefined();

    // the server ends a migration with the client that drove it: the next client finds the
    // device back in RUNNING (no device reset), pre-copy and DMA logging gone, memory intact
    const again = await attachGuest(srcServer, { reset: false, enable: false });
    expect(await again.client.getMigState()).toBe(MigState.RUNNING);
    expect(((await settle(again.client.precopyInfo())) as VfioUserError).errno).toBe(Errno.EINVAL);
    expect(((await settle(again.client.dmaLoggingReport(RAM_IOVA, RAM, 4096n))) as VfioUserError).errno).toBe(Errno.EINVAL);
    expect(await again.registers()).toEqual(regsBefore);
    expect(await again.checksum()).toBe(before);
    await again.wireMsi(false); // MSI stays enabled in config space; the eventfd went with the old client
    const works = await checkDeviceWorks(again, "source");
    expect(works.ok, works.detail).toBe(true);
  });

  it("snapshot save/restore round-trips bigmem; an edu stream fed to bigmem is refused", async () => {
    const file = join(dir, "bigmem.snap");
    const eduFile = join(dir, "edu.snap");
    // a bigmem state to keep
    const g = await attachGuest(srcServer);
    await g.fillFromGuest();
    const sum = await g.checksum();
    closeAll();
    await new Promise((r) => setTimeout(r, 20));
    const saved = await snapshotSave(srcServer.socket, file);
    expect(saved.bytes).toBeGreaterThan(32 << 20);

    // restore it into the other server
    const restored = await snapshotRestore(dstServer.socket, file);
    expect(restored.bytes).toBe(saved.bytes);
    const d = await attachGuest(dstServer, { reset: false, enable: false });
    expect(await d.client.getMigState()).toBe(MigState.RUNNING);
    expect(await d.checksum()).toBe(sum);
    closeAll();
    await new Promise((r) => setTimeout(r, 20));

    // an edu stream is refused for bigmem before anything is sent: the device keeps running as it was
    await snapshotSave(eduServer.socket, eduFile);
    const err = await settle(snapshotRestore(dstServer.socket, eduFile));
    expect(err).toBeInstanceOf(SnapshotError);
    const se = err as SnapshotError;
    expect(se.refused).toBe(true);
    expect(se.errno).toBe(Errno.EINVAL);
    expect(se.deviceState).toBe(MigState.RUNNING);
    expect(se.message).toMatch(/holds state for 'edu' state version 1; the device at .* is 'bigmem' state version \d+: nothing was sent/);

    // unchecked (--no-check), the server refuses it (EINVAL); the CLI says so and exits 1; the next client finds the device running
    const cli = await runCli(["snapshot", "restore", "--socket", dstServer.socket, "--file", eduFile, "--no-check"]);
    expect(cli.code).toBe(1);
    expect(cli.stderr).toContain("refused");
    expect(cli.stderr).toContain("EINVAL");
    const after = await connect(dstServer.socket);
    try {
      expect(await after.getMigState()).toBe(MigState.RUNNING);
    } finally {
      after.close();
    }
  });
});

function runCli(args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [CLI, ...args], { stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (b: Buffer) => (stdout += b.toString()));
    child.stderr.on("data", (b: Buffer) => (stderr += b.toString()));
    child.on("exit", (code) => resolve({ code, stdout, stderr }));
  });
}

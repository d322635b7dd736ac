/**
 * QEMU-driven migrations that do not complete, with the migrating client:
 *
 * - `migrate_cancel` during pre-copy (bigmem, bandwidth capped): the source
 *   stops DMA logging, its device goes PRE_COPY -> RUNNING, device memory is
 *   intact and keeps working; the destination server, left in RESUMING,
 *   resets its device (abort is reset).
 * - a stream the destination refuses (one byte of its second MIG_DATA_WRITE
 *   flipped in transit), `return-path` on: the destination's load fails,
 *   the source reports `failed`, resumes, and its device runs with its
 *   registers intact.
 * - a destination device that speaks another state version (same PCI
 *   identity): the server refuses the stream's header; the source resumes.
 * - a destination server for another device type (edu -> bigmem): the
 *   same, by device type. (Before the server judged the HEADER on arrival,
 *   QEMU's own config-space check was what refused this one.)
 */
import { afterEach, expect, it } from "vitest";
import { BigmemDevice } from "../../devices/bigmem/bigmem.ts";
import { EduDevice, eduFactorial } from "../../devices/edu/edu.ts";
import { Command } from "../../protocol/constants.ts";
import type { Handler } from "../../src/server/dispatcher.ts";
import { handleMigDataWrite } from "../../src/server/handlers/migration-data.ts";
import { BIGMEM_DEVICE_ID, BIGMEM_VENDOR, BigmemGuest } from "./harness/bigmem-guest.ts";
import { describeQemuMig } from "./harness/describe-qemu.ts";
import { EduGuest, REG, bringUp, pattern, pollUntil } from "./harness/edu-guest.ts";
import { describeMigration, runState, settledRunState, startMigration } from "./harness/migrate.ts";
import { MIG_SLOT, MigrationPair, commandCounts, inProcess, logged, states } from "./harness/mig-pair.ts";
import * as pci from "./harness/pci.ts";
import { startServer } from "./harness/server.ts";

const BDF = pci.bdf(0, MIG_SLOT, 0);
const MiB = 1 << 20;

let pair: MigrationPair | undefined;
afterEach(async () => {
  await pair?.stop();
  pair = undefined;
});

async function withContext(p: MigrationPair, fn: () => Promise<void>): Promise<void> {
  try {
    await fn();
  } catch (e) {
    if (e instanceof Error) e.message += `\n${p.context()}`;
    throw e;
  }
}

/** Programs edu on the source and returns what the registers must read afterwards. */
async function programEdu(p: MigrationPair): Promise<{ e: EduGuest; expect: { liveness: number; factorial: number } }> {
  const bar0 = await bringUp(p.src.qtest, BDF, new pci.BarAllocator());
  const e = new EduGuest(p.src.qtest, BDF, bar0);
  await e.write(REG.LIVENESS, 0x0badf00d);
  expect(await e.factorial(8)).toBe(eduFactorial(8));
  return { e, expect: { liveness: ~0x0badf00d >>> 0, factorial: eduFactorial(8) } };
}

describeQemuMig("QEMU-driven migrations that fail or are cancelled", () => {
  it("migrate_cancel during pre-copy: DMA logging stopped, PRE_COPY -> RUNNING, device memory intact and writable", async () => {
    const p = (pair = new MigrationPair("vfu-mig-cancel-", { device: "bigmem", serverArgs: ["--opt", "size=64M"] }));
    await withContext(p, async () => {
      await p.startSource();
      expect(await pci.findDevice(p.src.qtest, BIGMEM_VENDOR, BIGMEM_DEVICE_ID)).toBe(BDF);
      const g = await BigmemGuest.bringUp(p.src.qtest, BDF);
      const words: [bigint, number][] = [];
      for (let i = 0; i < 256; i++) {
        const at = BigInt(i) * 256n * 1024n + BigInt((i * 4) % 4096);
        const v = (0x51000000 + i * 7919) >>> 0;
        words.push([at, v]);
        await g.memWritel(at, v);
      }
      await p.startDestination();
      const markA = p.srvA.log.length;
      const markB = p.srvB.log.length;
      const m = await startMigration(p.src, p.dst, p.dir, { parameters: { "max-bandwidth": 4 * MiB } });
      await m.waitSource(["active"], 30_000);
      await pollUntil("some pre-copy data read", async () => commandCounts(p.srvA, markA).MIG_DATA_READ ?? 0, (n) => n >= 2, 30_000);
      expect(states(p.srvA, markA)).toEqual(["RUNNING->PRE_COPY"]);
      await p.src.qmp.execute("migrate_cancel");
      const r = await m.finish(30_000);
      console.log(`[qemu-mig cancel] ${describeMigration(r)}`);
      expect(r.status).toBe("cancelled");
      expect(await settledRunState(p.src)).toBe("running");
      await pollUntil("source device back to RUNNING", async () => states(p.srvA, markA).join(","), (s) => s.endsWith("PRE_COPY->RUNNING"), 30_000);
      expect(states(p.srvA, markA)).toEqual(["RUNNING->PRE_COPY", "PRE_COPY->RUNNING"]);
      await pollUntil("DMA_LOGGING_STOP", async () => logged(p.srvA, /^DMA logging stopped$/, markA).length, (n) => n === 1, 30_000);
      let intact = 0;
      for (const [at, v] of words) if ((await g.memReadl(at)) === v) intact++;
      console.log(`[qemu-mig cancel] ${intact}/${words.length} device-memory words intact on the source`);
      expect(intact).toBe(words.length);
      await g.memWritel(0x1000n, 0xc0c0c0c0);
      expect(await g.memReadl(0x1000n)).toBe(0xc0c0c0c0);
      expect(p.srvA.problems(markA)).toEqual([]);
      // the destination's QEMU gives up; its server drops the partial stream
      await p.dst.exited;
      await pollUntil("server B notices", async () => logged(p.srvB, /client left while RESUMING/, markB).length, (n) => n === 1, 30_000);
    });
  }, 180_000);

  it("a refused stream with return-path: the destination fails its load, the source resumes with its device intact", async () => {
    let writes = 0;
    // in transit to server B: one byte of the second MIG_DATA_WRITE's payload flipped
    const corrupt: Handler = (req) => {
      if (++writes === 2 && req.body.length > 8 + 64) req.body[8 + 40] ^= 0x01;
      return handleMigDataWrite(req);
    };
    const p = (pair = new MigrationPair("vfu-mig-refuse-", {
      device: "bigmem",
      serverArgs: ["--opt", "size=8M"],
      destinationServer: (dir) => inProcess(startServer({ dir, device: new BigmemDevice({ size: "8M" }), name: "b.sock", handlers: [[Command.MIG_DATA_WRITE, corrupt]] })),
    }));
    await withContext(p, async () => {
      await p.startSource();
      const g = await BigmemGuest.bringUp(p.src.qtest, BDF);
      const data = pattern(64 * 1024, 0x4242);
      await g.memWrite(0x10000n, data);
      await p.startDestination();
      const markA = p.srvA.log.length;
      const markB = p.srvB.log.length;
      const m = await startMigration(p.src, p.dst, p.dir, { capabilities: { "return-path": true } });
      const r = await m.finish(60_000);
      console.log(`[qemu-mig refused] ${describeMigration(r)}; MIG_DATA_WRITEs seen by B: ${writes}`);
      expect(r.status).toBe("failed");
      expect(writes).toBeGreaterThanOrEqual(2);
      const refusal = logged(p.srvB, /request refused|refused/, markB).map((x) => String(x.reason ?? x.msg));
      expect(refusal.some((x) => /CRC|checksum/i.test(x))).toBe(true);
      // the source resumes its VM and its device
      await pollUntil("source VM running again", () => runState(p.src), (s) => s === "running", 20_000);
      await pollUntil("source device RUNNING", async () => states(p.srvA, markA).at(-1) ?? "", (s) => s.endsWith("->RUNNING"), 20_000);
      console.log(`[qemu-mig refused] source: ${states(p.srvA, markA).join(", ")}; destination: ${states(p.srvB, markB).join(", ")}`);
      expect((await g.memRead(0x10000n, data.length)).equals(data)).toBe(true);
      await g.memWritel(0x20n, 0x99);
      expect(await g.memReadl(0x20n)).toBe(0x99);
      expect(p.srvA.problems(markA)).toEqual([]);
    });
  }, 120_000);

  /** Migrates edu to a destination that must refuse, `return-path` on; the source must resume with edu intact. */
  async function refusedMigration(p: MigrationPair): Promise<{ markB: number }> {
    await p.startSource();
    const { e, expect: want } = await programEdu(p);
    await p.startDestination();
    const markA = p.srvA.log.length;
    const markB = p.srvB.log.length;
    const m = await startMigration(p.src, p.dst, p.dir, { capabilities: { "return-path": true } });
    const r = await m.finish(60_000);
    console.log(`[qemu-mig refused] ${describeMigration(r)}`);
    expect(r.status).toBe("failed");
    await pollUntil("source VM running again", () => runState(p.src), (s) => s === "running", 20_000);
    await pollUntil("source device RUNNING", async () => states(p.srvA, markA).at(-1) ?? "", (s) => s.endsWith("->RUNNING"), 20_000);
    console.log(`[qemu-mig refused] source: ${states(p.srvA, markA).join(", ")}; destination: ${states(p.srvB, markB).join(", ")}`);
    expect({ liveness: await e.read(REG.LIVENESS), factorial: await e.read(REG.FACTORIAL) }).toEqual(want);
    expect(await e.factorial(5)).toBe(eduFactorial(5));
    expect(p.srvA.problems(markA)).toEqual([]);
    return { markB };
  }

  it("a destination device of the same PCI identity but another state version: the server refuses the stream's header; the source resumes", async () => {
    const p = (pair = new MigrationPair("vfu-mig-version-", {
      destinationServer: (dir) => inProcess(startServer({ dir, device: eduWithStateVersion(2), name: "b.sock" })),
    }));
    await withContext(p, async () => {
      const { markB } = await refusedMigration(p);
      const refusals = logged(p.srvB, /request refused/, markB).map((x) => `${String(x.cmd)}: ${String(x.reason)}`);
      console.log(`[qemu-mig refused] destination server refused: ${refusals.join(" | ")}`);
      expect(refusals.some((x) => /^MIG_DATA_WRITE: .*state version 1, this device speaks 2/.test(x))).toBe(true);
    });
  }, 120_000);

  it("a destination server for another device type (edu -> bigmem): the server refuses the stream's header; the source resumes", async () => {
    const p = (pair = new MigrationPair("vfu-mig-type-", { destinationDevice: "bigmem", destinationServerArgs: ["--opt", "size=1M"] }));
    await withContext(p, async () => {
      const { markB } = await refusedMigration(p);
      const refusals = logged(p.srvB, /request refused/, markB).map((x) => `${String(x.cmd)}: ${String(x.reason)}`);
      console.log(`[qemu-mig refused] destination server refused: ${refusals.join(" | ")}`);
      expect(refusals.some((x) => /^MIG_DATA_WRITE: stream is for device type 'edu', this device is 'bigmem'/.test(x))).toBe(true);
    });
  }, 120_000);
});

/** edu as it might be one release later: the same registers, a state layout it numbers otherwise. */
function eduWithStateVersion(version: number): EduDevice {
  return Object.defineProperty(new EduDevice(), "stateVersion", { value: version });
}

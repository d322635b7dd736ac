/**
 * The client conformance report for QEMU's migrating client, both builds
 * (docs/qemu-client-conformance.md has the tables these runs produce):
 *
 * - the prototype as found, against plain servers: its DMA_LOGGING_START
 *   (a ranges pointer) is refused and the migration fails at setup; the
 *   report names it, the source VM keeps running;
 * - the prototype as found, with a test-only shim on the source that
 *   serves the START and REPORT the server refused (prototype-shim.ts), so
 *   the client gets far enough to show every bug: the report names the
 *   START's pointer, the REPORT's size, command 19's argsz 0, the DMA_READ
 *   reply's u32 count (guest RAM without an fd), and on the destination the
 *   1 MiB MIG_DATA_WRITE left incomplete on the socket;
 * - the fixed build (prototype + the three fixes): none of those; what
 *   remains is listed and asserted.
 *
 * A destination that hangs is a bounded wait: the test waits for the
 * report to name the incomplete frame, with a deadline, then stops it.
 */
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { afterEach, expect, it } from "vitest";
import { BigmemDevice, BigmemReg } from "../../devices/bigmem/bigmem.ts";
import type { ClientReport, ConformanceReport, DeviationRecord } from "../../src/conformance/index.ts";
import { formatClientReport } from "../../src/conformance/index.ts";
import { BIGMEM_DEVICE_ID, BIGMEM_VENDOR, BigmemGuest } from "./harness/bigmem-guest.ts";
import { describeQemuMig } from "./harness/describe-qemu.ts";
import { EduGuest, REG, bringUp, pattern, pollUntil } from "./harness/edu-guest.ts";
import { describeMigration, settledRunState, startMigration } from "./harness/migrate.ts";
import { MIG_SLOT, MigrationPair, inProcess, logged, states, withContext } from "./harness/mig-pair.ts";
import * as pci from "./harness/pci.ts";
import { prototypeLoggingShim, type ShimCounts } from "./harness/prototype-shim.ts";
import { startServer, type ServerHandle } from "./harness/server.ts";

const BDF = pci.bdf(0, MIG_SLOT, 0);
const MiB = 1 << 20;
const RAM_A = 0x0100_0000n;

let pair: MigrationPair | undefined;
afterEach(async () => {
  await pair?.stop();
  pair = undefined;
});

function reportFile(p: MigrationPair, name: string): string {
  return join(p.dir.host, name);
}

function readReport(file: string): ConformanceReport {
  return JSON.parse(readFileSync(file, "utf8")) as ConformanceReport;
}

/**
 * The report file once it holds a client. A `serve` process logs "client
 * conformance report" and then writes the file: seeing the log line does not
 * mean the file is there yet (a loaded machine shows the gap), so poll it.
 */
async function clientInFile(file: string): Promise<ClientReport> {
  const { value } = await pollUntil(`a client in ${file}`, async () => {
    try {
      return readReport(file).clients.length;
    } catch {
      return -1; // not written yet
    }
  }, (n) => n >= 1, 30_000);
  expect(value).toBe(1);
  return readReport(file).clients[0]!;
}

function ids(r: ClientReport): string[] {
  return r.deviations.map((d) => `${d.severity} ${d.id} ${d.command}`).sort();
}

function find(r: ClientReport, id: string): DeviationRecord | undefined {
  return r.deviations.find((d) => d.id === id);
}

function show(what: string, r: ClientReport): void {
  console.log(`[qemu-mig conformance] ${what}\n${formatClientReport(r).join("\n")}\n${r.deviations.map((d) => `    ${d.id}: ${d.first.detail}`).join("\n")}`);
}

/** The client report a server logged when its client left (in-process or `serve`, both log it). */
function loggedReport(server: { log: { records(mark?: number): { msg: string; [k: string]: unknown }[] } }): { errors: number; warnings: number; deviations: { id: string; cmd: string; count: number; msgId: number; offset: number | null }[] } | undefined {
  return server.log.records().filter((r) => r.msg === "client conformance report").at(-1) as never;
}

describeQemuMig(
  "conformance report: QEMU's migration prototype as found",
  () => {
    it("plain servers: the ranges-pointer DMA_LOGGING_START is refused and named; the migration fails at setup; the source VM runs on", async () => {
      const p = (pair = new MigrationPair("vfu-conf-plain-", { qemu: "mig-asfound", serverArgs: (dir, side) => ["--client-report", join(dir.host, `${side}.json`)] }));
      await withContext(p, async () => {
        const fileA = reportFile(p, "a.json");
        await p.startSource();
        const bar0 = await bringUp(p.src.qtest, BDF, new pci.BarAllocator());
        const e = new EduGuest(p.src.qtest, BDF, bar0);
        await e.write(REG.LIVENESS, 0x1234);
        await p.startDestination();
        const markA = p.srvA.log.length;
        const m = await startMigration(p.src, p.dst, p.dir);
        const r = await m.finish(60_000);
        console.log(`[qemu-mig conformance] as found, plain servers: ${describeMigration(r)}`);
        expect(r.status).toBe("failed");
        expect(await settledRunState(p.src)).toBe("running");
        expect(states(p.srvA, markA)).toEqual([]);
        expect(await e.read(REG.LIVENESS)).toBe(~0x1234 >>> 0);
        await p.src.stop();
        await pollUntil("server A's report", async () => loggedReport(p.srvA)?.errors ?? -1, (n) => n >= 1, 30_000);
        const report = await clientInFile(fileA);
        show("as found, plain source server", report);
        expect(ids(report)).toContain("error dma-logging-ranges-not-inline DEVICE_FEATURE");
        expect(find(report, "dma-logging-ranges-not-inline")!.first.offset).toBe(24);
      });
    }, 120_000);

    it("with the logging shim on the source: every bug of the list is named, on the side that sees it", async () => {
      const shim: ShimCounts = { start: 0, report: 0 };
      let a: ServerHandle | undefined;
      let bHandle: ServerHandle | undefined;
      const p = (pair = new MigrationPair("vfu-conf-asfound-", {
        qemu: "mig-asfound",
        device: "bigmem",
        memfd: false,
        serverArgs: ["--opt", "size=8M"],
        sourceServer: (dir) => {
          a = startServer({ dir, device: new BigmemDevice({ size: "8M" }), name: "a.sock", handlers: [prototypeLoggingShim(shim)], conformance: true });
          return inProcess(a);
        },
        destinationServer: (dir) => {
          bHandle = startServer({ dir, device: new BigmemDevice({ size: "8M" }), name: "b.sock", conformance: true });
          return inProcess(bHandle);
        },
      }));
      await withContext(p, async () => {
        await p.startSource();
        expect(await pci.findDevice(p.src.qtest, BIGMEM_VENDOR, BIGMEM_DEVICE_ID)).toBe(BDF);
        const g = await BigmemGuest.bringUp(p.src.qtest, BDF);
        // device memory worth migrating: 8 MiB, so the destination gets full 1 MiB MIG_DATA_WRITEs
        for (let i = 0; i < 8; i++) await g.memWrite(BigInt(i * MiB), pattern(MiB, 0x100 + i));
        // guest RAM has no fd: the device's DMA goes over the socket (DMA_READ from guest RAM, DMA_WRITE to it)
        const ram = pattern(4096, 0x55);
        await p.src.qtest.write(RAM_A, ram);
        await g.startDma(RAM_A, 0x10000n, 4096n, false);
        await pollUntil("bigmem DMA from guest RAM done", () => g.read(BigmemReg.DMA_CMD), (c) => (c & 1) === 0, 30_000);
        await g.memWrite(0x20000n, pattern(4096, 0x66));
        await g.startDma(RAM_A + 0x10000n, 0x20000n, 4096n, true);
        await pollUntil("bigmem DMA to guest RAM done", () => g.read(BigmemReg.DMA_CMD), (c) => (c & 1) === 0, 30_000);
        const landed = await p.src.qtest.read(RAM_A + 0x10000n, 4096);
        const sent = pattern(4096, 0x66);
        console.log(`[qemu-mig conformance] as found: device DMA_WRITE of 4096 bytes: guest RAM equals them: ${landed.equals(sent)}; equals them 4 bytes later: ${landed.subarray(4).equals(sent.subarray(0, 4092))}`);

        await p.startDestination();
        const markA = p.srvA.log.length;
        const m = await startMigration(p.src, p.dst, p.dir);
        // the destination's 1 MiB MIG_DATA_WRITE stops part-way on the socket: server B names the frame
        // once it has waited 2 s for the rest (a bounded wait: the deadline fails the test, never a hang)
        const r = await m.finish(120_000);
        console.log(`[qemu-mig conformance] as found with the shim: source ${describeMigration(r)}; the shim served ${shim.start} START, ${shim.report} REPORT`);
        console.log(`[qemu-mig conformance] destination MIGRATION statuses: ${m.destinationStatuses().join(", ")}; server A states: ${states(p.srvA, markA).join(", ")}; server B states: ${states(p.srvB).join(", ")}`);
        console.log(`[qemu-mig conformance] destination QEMU stderr: ${p.dst.stderr().split("\n").filter((l) => /vfio|migrat|error/i.test(l)).slice(-6).join(" | ")}`);
        expect(r.status).toBe("failed");
        await m.waitDestination(["failed"], 60_000);
        expect(await settledRunState(p.src)).toBe("running");
        expect(states(p.srvA, markA)).toEqual(["RUNNING->PRE_COPY", "PRE_COPY->RUNNING"]);
        await Promise.all([p.dst.stop(), p.src.stop()]);
        await pollUntil("both reports", async () => [loggedReport(p.srvA), loggedReport(p.srvB)].filter(Boolean).length, (n) => n === 2, 20_000);
        const ra = a!.server.conformance!.report().clients[0]!;
        const rb = bHandle!.server.conformance!.report().clients[0]!;
        show("as found, source server (shim on DEVICE_FEATURE)", ra);
        show("as found, destination server", rb);
        expect(shim.start).toBe(1);
        expect(shim.report).toBeGreaterThanOrEqual(1);
        // source: every bug it can show, once each, with the field at fault
        expect(ids(ra)).toEqual(
          [
            "error dma-logging-ranges-not-inline DEVICE_FEATURE",
            "error dma-logging-report-size DEVICE_FEATURE",
            "error dma-reply-count DMA_READ",
            "warning argsz-zero MIG_GET_PRECOPY_INFO",
            "warning dma-write-reply-empty DMA_WRITE",
            "warning feature-get-data DEVICE_FEATURE",
          ].sort(),
        );
        expect(find(ra, "dma-logging-ranges-not-inline")!.first.offset).toBe(24);
        expect(find(ra, "dma-logging-report-size")!.first.offset).toBe(32);
        expect(find(ra, "dma-logging-report-size")!.first.detail).toMatch(/32-byte struct \(bitmap pointer at offset 24\) followed by \d+ bytes of bitmap buffer/);
        expect(find(ra, "dma-reply-count")!.first).toMatchObject({ offset: 8, detail: expect.stringMatching(/a u32 count, data at offset 12/) });
        expect(find(ra, "argsz-zero")!.first.offset).toBe(0);
        // the DMA_WRITE's data landed 4 bytes late in guest RAM (the u32 count: the server cannot see it in the empty reply)
        expect(landed.subarray(4).equals(sent.subarray(0, 4092))).toBe(true);
        // destination: the MIG_DATA_WRITE left incomplete on the socket
        expect(ids(rb)).toEqual(["error frame-incomplete MIG_DATA_WRITE", "warning feature-get-data DEVICE_FEATURE"]);
        const inc = find(rb, "frame-incomplete")!;
        expect(inc.first.offset).toBeGreaterThan(0);
        expect(inc.first.offset).toBeLessThan(MiB);
        expect(inc.first.detail).toMatch(/of the 1048600 bytes its header announces arrived/);
      });
    }, 300_000);
  },
  "mig-asfound",
);

/** What the prototype as found is named for; the fixed build must be named for none of it. */
const AS_FOUND_BUGS = ["dma-logging-ranges-not-inline", "dma-logging-report-size", "dma-reply-count", "frame-incomplete"];

describeQemuMig("conformance report: QEMU's migrating client, fixed build", () => {
  it("bigmem 8 MiB, guest RAM without an fd, DMA both ways, a completed migration: none of the as-found bugs; what remains is listed", async () => {
    const p = (pair = new MigrationPair("vfu-conf-fixed-", {
      device: "bigmem",
      memfd: false,
      serverArgs: (dir, side) => ["--opt", "size=8M", "--client-report", join(dir.host, `${side}.json`)],
    }));
    await withContext(p, async () => {
      await p.startSource();
      const g = await BigmemGuest.bringUp(p.src.qtest, BDF);
      for (let i = 0; i < 8; i++) await g.memWrite(BigInt(i * MiB), pattern(MiB, 0x100 + i));
      const ram = pattern(4096, 0x55);
      await p.src.qtest.write(RAM_A, ram);
      await g.dma(RAM_A, 0x10000n, 4096n, false);
      expect((await g.memRead(0x10000n, 4096)).equals(ram)).toBe(true);
      const out = pattern(4096, 0x66);
      await g.memWrite(0x20000n, out);
      await g.dma(RAM_A + 0x10000n, 0x20000n, 4096n, true);
      expect((await p.src.qtest.read(RAM_A + 0x10000n, 4096)).equals(out)).toBe(true);
      await p.startDestination();
      const markA = p.srvA.log.length;
      const m = await startMigration(p.src, p.dst, p.dir);
      const r = await m.finish(120_000);
      console.log(`[qemu-mig conformance] fixed build: ${describeMigration(r)}`);
      expect(r.status).toBe("completed");
      await m.waitDestination(["completed"], 30_000);
      expect(states(p.srvA, markA)).toEqual(["RUNNING->PRE_COPY", "PRE_COPY->STOP_COPY", "STOP_COPY->STOP"]);
      // both QEMUs leave: the servers write their reports
      await Promise.all([p.src.stop(), p.dst.stop()]);
      await pollUntil("both reports", async () => logged(p.srvA, /^client conformance report$/).length + logged(p.srvB, /^client conformance report$/).length, (n) => n === 2, 20_000);
      const ra = await clientInFile(reportFile(p, "a.json"));
      const rb = await clientInFile(reportFile(p, "b.json"));
      show("fixed build, source server", ra);
      show("fixed build, destination server", rb);
      for (const rep of [ra, rb]) for (const id of AS_FOUND_BUGS) expect(find(rep, id), id).toBeUndefined();
      // what the fixed client still does: all accepted (warnings)
      expect(ids(ra)).toEqual(
        ["warning argsz-zero MIG_GET_PRECOPY_INFO", "warning dma-logging-not-stopped DEVICE_FEATURE", "warning dma-write-reply-empty DMA_WRITE", "warning feature-get-data DEVICE_FEATURE"].sort(),
      );
      expect(ids(rb)).toEqual(["warning feature-get-data DEVICE_FEATURE"]);
      expect(ra.errors + rb.errors).toBe(0);
    });
  }, 240_000);
});

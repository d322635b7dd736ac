/**
 * QEMU-driven migration of bigmem 256 MiB with the migrating QEMU client
 * (docker/qemu-mig.sh): total time, downtime as QEMU reports it, pre-copy
 * rounds (QEMU's dirty syncs), what the device moved, with a downtime limit
 * set (default 5 ms) and no bandwidth cap, idle and with ~1% of the device's
 * pages written through BAR2 per round while pre-copy runs.
 *
 *   npx tsx test/bench/qemu-downtime.ts [--limit-ms 5] [--size 256M] [--runs 3]
 *
 * `qemuDowntimeRows()` is what `npm run bench` calls. Nothing is asserted:
 * figures are printed beside the limit QEMU was given.
 */
import { BIGMEM_PAGE_SIZE } from "../../devices/bigmem/bigmem.ts";
import { BigmemGuest } from "../e2e/harness/bigmem-guest.ts";
import { startMigration, type MigrateInfo } from "../e2e/harness/migrate.ts";
import { MIG_SLOT, MigrationPair, commandCounts, states } from "../e2e/harness/mig-pair.ts";
import * as pci from "../e2e/harness/pci.ts";
import { qemuMigAvailable } from "../e2e/harness/shared-dir.ts";

export interface DowntimeRun {
  workload: "idle" | "1% dirty per round";
  limitMs: number;
  status: string;
  totalMs: number;
  downtimeMs: number;
  expectedDowntimeMs: number | undefined;
  dirtySyncs: number;
  deviceMiB: number;
  /** Words written into device memory while pre-copy ran. */
  writes: number;
  migDataSizeQueries: number;
  precopyInfoQueries: number;
}

const MiB = 1 << 20;

async function oneRun(workload: DowntimeRun["workload"], limitMs: number, size: string): Promise<DowntimeRun> {
  const p = new MigrationPair("vfu-bench-dt-", { device: "bigmem", serverArgs: ["--opt", `size=${size}`], memMiB: 256 });
  try {
    await p.startSource();
    const g = await BigmemGuest.bringUp(p.src.qtest, pci.bdf(0, MIG_SLOT, 0));
    const bytes = Number(await pci.barSize(p.src.qtest, g.bdf, 2));
    const pages = bytes / BIGMEM_PAGE_SIZE;
    // something in every 16th page, so device memory is not all zero
    for (let pg = 0; pg < pages; pg += 16) await g.memWritel(BigInt(pg * BIGMEM_PAGE_SIZE), pg);
    await p.startDestination();
    const markA = p.srvA.log.length;
    const m = await startMigration(p.src, p.dst, p.dir, { parameters: { "downtime-limit": limitMs, "max-bandwidth": 16 * 1024 * MiB } });
    let writes = 0;
    if (workload !== "idle") {
      // ~1% of the pages per round, one word each, until the migration ends
      const perRound = Math.max(1, Math.floor(pages / 100));
      let seed = 12345;
      for (;;) {
        const ended = m.sourceStatuses().some((s) => s === "completed" || s === "failed" || s === "cancelled" || s === "device");
        if (ended || states(p.srvA, markA).some((s) => s.includes("STOP_COPY"))) break;
        for (let i = 0; i < perRound; i++) {
          seed = (seed * 1103515245 + 12345) >>> 0;
          const pg = seed % pages;
          try {
            await g.memWritel(BigInt(pg * BIGMEM_PAGE_SIZE + 8), seed);
          } catch {
            break; // the VM stopped under us
          }
          writes++;
        }
      }
    }
    const r = await m.finish(300_000);
    const info: MigrateInfo = r.info;
    const counts = commandCounts(p.srvA, markA);
    return {
      workload,
      limitMs,
      status: r.status,
      totalMs: info["total-time"] ?? r.wallMs,
      downtimeMs: info.downtime ?? NaN,
      expectedDowntimeMs: info["expected-downtime"],
      dirtySyncs: info.ram?.["dirty-sync-count"] ?? 0,
      deviceMiB: (info.vfio?.transferred ?? 0) / MiB,
      writes,
      migDataSizeQueries: counts.DEVICE_FEATURE ?? 0,
      precopyInfoQueries: counts.MIG_GET_PRECOPY_INFO ?? 0,
    };
  } finally {
    await p.stop();
  }
}

/** Rows for the bench table, or the reason there are none. */
export async function qemuDowntimeRows(opts: { limitMs?: number; size?: string; runs?: number } = {}): Promise<{ rows: DowntimeRun[] } | { skipped: string }> {
  const avail = qemuMigAvailable("mig");
  if (!avail.ok) return { skipped: avail.why };
  const rows: DowntimeRun[] = [];
  for (let i = 0; i < (opts.runs ?? 1); i++) {
    for (const w of ["idle", "1% dirty per round"] as const) rows.push(await oneRun(w, opts.limitMs ?? 5, opts.size ?? "256M"));
  }
  return { rows };
}

export function formatDowntimeRows(rows: readonly DowntimeRun[]): string {
  const head = "workload              limit  downtime  total     dirty syncs  device MiB  pre-copy writes  precopy-info queries";
  const lines = rows.map(
    (r) =>
      `${r.workload.padEnd(21)} ${`${r.limitMs} ms`.padEnd(6)} ${`${r.downtimeMs} ms`.padEnd(9)} ${`${r.totalMs} ms`.padEnd(9)} ${String(r.dirtySyncs).padEnd(12)} ${r.deviceMiB.toFixed(1).padEnd(11)} ${String(r.writes).padEnd(16)} ${r.precopyInfoQueries}` +
      (r.status !== "completed" ? `  (${r.status})` : ""),
  );
  return [head, ...lines].join("\n");
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const arg = (name: string) => {
    const i = process.argv.indexOf(name);
    return i >= 0 ? process.argv[i + 1] : undefined;
  };
  const res = await qemuDowntimeRows({ limitMs: Number(arg("--limit-ms") ?? 5), size: arg("--size") ?? "256M", runs: Number(arg("--runs") ?? 1) });
  if ("skipped" in res) {
    console.log(`QEMU-driven downtime: skipped: ${res.skipped}`);
  } else {
    console.log(`QEMU-driven migration, bigmem ${arg("--size") ?? "256M"}, no bandwidth cap (load ${(await import("node:fs")).readFileSync("/proc/loadavg", "utf8").trim()})`);
    console.log(formatDowntimeRows(res.rows));
  }
}

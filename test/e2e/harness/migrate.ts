/**
 * Live-migrating a VM between two QEMUs over QMP, as a management layer
 * does: the destination was started with `-incoming defer`; both get the
 * same migration capabilities (QEMU checks that `return-path` matches), the
 * source gets its parameters, the destination listens on a UNIX socket in
 * the shared directory, the source migrates to it. The MIGRATION events of
 * both sides are collected, so a test can act at a given stage (e.g. cancel
 * once the source is `active`) and see how each side ended. No vitest here.
 */
import { join } from "node:path";
import type { Qmp } from "./qmp.ts";

/** Anything with a QMP connection: a qtest QEMU or a Linux VM. */
type Vm = { readonly qmp: Qmp };
import { toGuestPath, type SharedDir } from "./shared-dir.ts";

/** The parts of `query-migrate` the tests read. */
export interface MigrateInfo {
  status: string;
  "total-time"?: number;
  downtime?: number;
  "expected-downtime"?: number;
  "setup-time"?: number;
  ram?: { transferred: number; total: number; duplicate: number; normal: number; "dirty-sync-count"?: number; remaining?: number };
  vfio?: { transferred: number };
  "error-desc"?: string;
}

export const MIGRATION_END = ["completed", "failed", "cancelled"] as const;
export type MigrationEnd = (typeof MIGRATION_END)[number];

export interface MigrationOptions {
  /** Capabilities set on both sides (`events` is always set). */
  capabilities?: Record<string, boolean>;
  /** `migrate-set-parameters` on the source, e.g. `{ "downtime-limit": 5, "max-bandwidth": 16 << 20 }`. */
  parameters?: Record<string, unknown>;
  /** Socket name inside the shared dir (default `migration-N.sock`). */
  socketName?: string;
}

export interface Migration {
  /** `unix:` URI as QEMU sees it. */
  readonly uri: string;
  /** MIGRATION statuses the source reported so far, in order. */
  sourceStatuses(): string[];
  /** MIGRATION statuses the destination reported so far, in order. */
  destinationStatuses(): string[];
  /** Resolves with the source's first status among `statuses` (default: an end state). */
  waitSource(statuses?: readonly string[], timeoutMs?: number): Promise<string>;
  /** Same for the destination. */
  waitDestination(statuses?: readonly string[], timeoutMs?: number): Promise<string>;
  /**
   * Waits for the source's end state and returns it with `query-migrate` and
   * the wall time since `migrate`. `timeoutMs` is the hard deadline; with
   * `stallMs`, it also fails as soon as the stream (RAM + device bytes
   * transferred, from `query-migrate` once a second) has not grown for that
   * long, and its error lists the progress seen.
   */
  finish(timeoutMs?: number, opts?: { stallMs?: number }): Promise<{ status: MigrationEnd; info: MigrateInfo; wallMs: number }>;
}

let socketCounter = 0;

/** Sets both sides up and sends `migrate`; returns at once (the migration runs). */
export async function startMigration(src: Vm, dst: Vm, dir: SharedDir, opts: MigrationOptions = {}): Promise<Migration> {
  const caps = Object.entries({ ...opts.capabilities, events: true }).map(([capability, state]) => ({ capability, state }));
  await dst.qmp.execute("migrate-set-capabilities", { capabilities: caps });
  await src.qmp.execute("migrate-set-capabilities", { capabilities: caps });
  if (opts.parameters && Object.keys(opts.parameters).length > 0) await src.qmp.execute("migrate-set-parameters", opts.parameters);
  const uri = `unix:${toGuestPath(join(dir.host, opts.socketName ?? `migration-${process.pid}-${++socketCounter}.sock`))}`;
  await dst.qmp.execute("migrate-incoming", { uri });

  // MIGRATION events from here on, read from each side's event log (not
  // consumed, so a test's own waitEvent calls are not disturbed)
  const statusesOf = (q: Vm, since: number) => () =>
    q.qmp
      .allEvents()
      .filter((ev) => ev.seq >= since && ev.event === "MIGRATION")
      .map((ev) => String(ev.data.status));
  const sourceStatuses = statusesOf(src, src.qmp.allEvents().length);
  const destinationStatuses = statusesOf(dst, dst.qmp.allEvents().length);
  const waitFor = (side: string, q: Vm, seen: () => string[]) => async (want: readonly string[] = MIGRATION_END, timeoutMs = 120_000): Promise<string> => {
    const deadline = performance.now() + timeoutMs;
    for (;;) {
      const hit = seen().find((st) => want.includes(st));
      if (hit !== undefined) return hit;
      // a QEMU that is gone sends nothing more: say so now, not at the deadline
      if (q.qmp.closed) throw new Error(`${side}: QEMU's QMP connection closed before a MIGRATION status ${want.join("|")} (seen: ${seen().join(", ") || "none"})`);
      if (performance.now() > deadline) throw new Error(`${side}: no MIGRATION status ${want.join("|")} within ${timeoutMs} ms (seen: ${seen().join(", ") || "none"})`);
      await new Promise((r) => setTimeout(r, 10));
    }
  };
  const waitSource = waitFor("source", src, sourceStatuses);
  const waitDestination = waitFor("destination", dst, destinationStatuses);

  const t0 = performance.now();
  await src.qmp.execute("migrate", { uri });
  return {
    uri,
    sourceStatuses,
    destinationStatuses,
    waitSource,
    waitDestination,
    async finish(timeoutMs = 120_000, opts: { stallMs?: number } = {}) {
      const stallMs = opts.stallMs;
      let status: MigrationEnd;
      if (stallMs === undefined) {
        status = (await waitSource(MIGRATION_END, timeoutMs)) as MigrationEnd;
      } else {
        status = await waitWithProgress(src, sourceStatuses, t0, timeoutMs, stallMs);
      }
      const wallMs = performance.now() - t0;
      const info = await src.qmp.execute<MigrateInfo>("query-migrate");
      return { status, info, wallMs };
    },
  };
}

/** Bytes the migration stream has carried so far (RAM and device). */
function streamBytes(i: MigrateInfo): number {
  return (i.ram?.transferred ?? 0) + (i.vfio?.transferred ?? 0);
}

/**
 * The source's end state, polling `query-migrate` once a second: fails when
 * the stream has not grown for `stallMs`, or at `timeoutMs` whatever it does.
 */
async function waitWithProgress(src: Vm, seen: () => string[], t0: number, timeoutMs: number, stallMs: number): Promise<MigrationEnd> {
  const deadline = t0 + timeoutMs;
  const samples: string[] = [];
  let bytes = -1;
  let grewAt = performance.now();
  let nextPoll = 0;
  const fail = (why: string) => new Error(`source: ${why} (MIGRATION statuses: ${seen().join(", ") || "none"}); progress, one sample a second (s: status bytes dirty-syncs remaining):\n${samples.slice(-40).join("\n")}`);
  for (;;) {
    const hit = seen().find((st) => (MIGRATION_END as readonly string[]).includes(st));
    if (hit !== undefined) return hit as MigrationEnd;
    if (src.qmp.closed) throw fail("QEMU's QMP connection closed before the migration ended");
    const now = performance.now();
    if (now >= nextPoll) {
      nextPoll = now + 1000;
      const info = await src.qmp.execute<MigrateInfo>("query-migrate").catch((e: Error) => ({ status: `query-migrate failed: ${e.message}` }) as MigrateInfo);
      const b = streamBytes(info);
      samples.push(`${((now - t0) / 1000).toFixed(0)}: ${info.status} ${b} ${info.ram?.["dirty-sync-count"] ?? "?"} ${info.ram?.remaining ?? "?"}`);
      if (b > bytes) {
        bytes = b;
        grewAt = now;
      }
      if (now - grewAt > stallMs) throw fail(`the stream did not grow for ${stallMs} ms`);
    }
    if (now > deadline) throw fail(`no end within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** `query-status` of a QEMU: running, paused, inmigrate, postmigrate, ... */
export async function runState(q: Vm): Promise<string> {
  return (await q.qmp.execute<{ status: string }>("query-status")).status;
}

/**
 * The run state once a migration's end has settled. QEMU emits the source's
 * MIGRATION `completed` (or `failed`) event and only then, after the
 * migration thread takes the BQL again (migration_iteration_finish), leaves
 * `finish-migrate` for `postmigrate` (or back to `running`): a query right
 * after the event can land in between, more often on a loaded machine. So
 * this polls while the state is `finish-migrate`, up to `timeoutMs`.
 */
export async function settledRunState(q: Vm, timeoutMs = 30_000): Promise<string> {
  const deadline = performance.now() + timeoutMs;
  let polls = 0;
  for (;;) {
    const st = await runState(q);
    polls++;
    if (st !== "finish-migrate") return st;
    if (performance.now() > deadline) throw new Error(`run state still ${st} ${timeoutMs} ms after the migration ended (${polls} polls)`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** One line for logs: status, total time, downtime, RAM and device bytes. */
export function describeMigration(r: { status: string; info: MigrateInfo; wallMs: number }): string {
  const i = r.info;
  const mib = (n: number | undefined) => (n === undefined ? "?" : `${(n / 1048576).toFixed(1)} MiB`);
  return (
    `${r.status} in ${r.wallMs.toFixed(0)} ms wall (QEMU total-time ${i["total-time"] ?? "?"} ms, downtime ${i.downtime ?? "?"} ms, ` +
    `setup ${i["setup-time"] ?? "?"} ms), stream ${mib(i.ram?.transferred)} (${i.ram?.normal ?? "?"} RAM pages sent, ${i.ram?.["dirty-sync-count"] ?? "?"} dirty syncs), device ${mib(i.vfio?.transferred)}` +
    (i["error-desc"] ? `; error: ${i["error-desc"]}` : "")
  );
}

/**
 * `npm run bench`: vfio-user-ts beside two baselines, measured side by side
 * in one interleaved run and printed as one table.
 *
 * Columns:
 * - C echo (c-echo.c): the floor, a C server over a UNIX socket that answers
 *   each request with a reply of the real size and does nothing else.
 * - libvfio-user (nutanix, efd091b): the reference C server, built on demand
 *   outside the tree (peers.ts). Its samples/server for REGION_READ/WRITE,
 *   CPU, syscalls, posted writes, DMA logging and DMA_MAPs (one client per
 *   process: restarted per connection; 4-byte accesses on BAR1, region 1
 *   offset 0), lvu_big (256 MiB of migration state, memcpy) for migration.
 * - ours: the CLI server (`vfio-user-ts serve --device edu|bigmem`), or
 *   bench-server.ts where a row must reach inside it.
 * One C client (client.c, built with `cc -O2` into a temp dir) drives every
 * column, so client cost is the same everywhere. The Node echo
 * (echo-server.ts: our native transport without framing, dispatch or
 * device) stays as a diagnostic row.
 *
 * Rounds: each round measures every cell in turn (C echo, libvfio-user,
 * ours, C echo, ...) so load that drifts over seconds hits all columns
 * alike; cells are medians over the rounds (stats.ts).
 *
 *   npm run bench [-- --quick] [-- --rounds N] [-- --no-qemu] [-- --no-peers]
 *   (or BENCH_QUICK=1, BENCH_ROUNDS=N)
 *
 * A benchmark reports; it never fails on a target. Every child is killed and
 * the temp dir removed at exit, on error and on Ctrl-C.
 */
import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { MAX_DMA_MAPS, fillDmaTable } from "./dma-maps.ts";
import { ensureLvu, type LvuPeer } from "./peers.ts";
import { median, ratio, verdict } from "./stats.ts";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const CLI = path.join(ROOT, "src/cli/vfio-user-ts.mjs");
const BENCH = path.join(ROOT, "test/bench");
const ARGS = process.argv.slice(2);
const QUICK = process.env.BENCH_QUICK === "1" || ARGS.includes("--quick");
const argNum = (name: string): number | undefined => {
  const i = ARGS.indexOf(name);
  const v = i >= 0 ? Number(ARGS[i + 1]) : NaN;
  return Number.isFinite(v) && v > 0 ? Math.floor(v) : undefined;
};
const ROUNDS = argNum("--rounds") ?? (Number(process.env.BENCH_ROUNDS) || (QUICK ? 2 : 7));
const NO_QEMU = ARGS.includes("--no-qemu");
const NO_PEERS = ARGS.includes("--no-peers");
const loadavg = (): string => readFileSync("/proc/loadavg", "utf8").trim().split(" ").slice(0, 3).join(" ");

// ---------------------------------------------------------------- children

interface Child {
  name: string;
  proc: ChildProcess;
  pid: number;
  lines: string[];
  waiters: Array<() => void>;
  stderr: string;
  exited: Promise<number | null>;
  exitCode: number | null | undefined;
}

const children = new Set<Child>();
let tmp = "";

function cleanup(): void {
  for (const c of children) {
    if (c.exitCode === undefined) {
      try {
        process.kill(c.pid, "SIGKILL");
      } catch {
        // already gone
      }
    }
  }
  children.clear();
  if (tmp) {
    rmSync(tmp, { recursive: true, force: true });
    tmp = "";
  }
}

process.on("exit", cleanup);
for (const sig of ["SIGINT", "SIGTERM", "SIGHUP"] as const) {
  process.on(sig, () => {
    cleanup();
    process.exit(130);
  });
}

function start(name: string, cmd: string, args: string[]): Child {
  const proc = spawn(cmd, args, { cwd: ROOT, stdio: ["pipe", "pipe", "pipe"] });
  if (proc.pid === undefined) throw new Error(`cannot start ${name}: ${cmd}`);
  const child: Child = {
    name,
    proc,
    pid: proc.pid,
    lines: [],
    waiters: [],
    stderr: "",
    exitCode: undefined,
    exited: new Promise((resolve) => {
      proc.on("exit", (code, signal) => {
        child.exitCode = code ?? (signal ? -1 : null);
        children.delete(child);
        for (const w of child.waiters.splice(0)) w();
        resolve(code);
      });
    }),
  };
  proc.on("error", () => {}); // reported through exit / timeouts
  createInterface({ input: proc.stdout! }).on("line", (line) => {
    child.lines.push(line);
    for (const w of child.waiters.splice(0)) w();
  });
  proc.stderr!.on("data", (d: Buffer) => {
    child.stderr = (child.stderr + d.toString()).slice(-16384);
    for (const w of child.waiters.splice(0)) w();
  });
  children.add(child);
  return child;
}

/** Next stdout line matching `test` (earlier lines are consumed). */
async function nextLine(c: Child, test: (l: string) => boolean = () => true, timeoutMs = 120_000): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    while (c.lines.length > 0) {
      const l = c.lines.shift()!;
      if (test(l)) return l;
    }
    if (c.exitCode !== undefined) throw new Error(`${c.name} exited (${c.exitCode}) before the expected output\n${c.stderr.trim()}`);
    const left = deadline - Date.now();
    if (left <= 0) throw new Error(`${c.name}: timed out waiting for output\n${c.stderr.trim()}`);
    await new Promise<void>((resolve) => {
      const t = setTimeout(resolve, left);
      c.waiters.push(() => {
        clearTimeout(t);
        resolve();
      });
    });
  }
}

async function nextJson<T = Record<string, number>>(c: Child, timeoutMs?: number): Promise<T> {
  return JSON.parse(await nextLine(c, (l) => l.startsWith("{"), timeoutMs)) as T;
}

async function waitExit(c: Child, timeoutMs = 120_000): Promise<void> {
  const t = setTimeout(() => c.exitCode === undefined && process.kill(c.pid, "SIGKILL"), timeoutMs);
  const code = await c.exited;
  clearTimeout(t);
  if (code !== 0) throw new Error(`${c.name} failed (exit ${code})\n${c.stderr.trim()}`);
}

async function stop(c: Child): Promise<void> {
  if (c.exitCode !== undefined) return;
  process.kill(c.pid, "SIGTERM");
  const t = setTimeout(() => c.exitCode === undefined && process.kill(c.pid, "SIGKILL"), 3000);
  await c.exited;
  clearTimeout(t);
}

async function waitSocket(c: Child, sock: string): Promise<void> {
  const deadline = Date.now() + 30_000;
  while (!existsSync(sock)) {
    if (c.exitCode !== undefined) throw new Error(`${c.name} exited (${c.exitCode})\n${c.stderr.trim()}`);
    if (Date.now() > deadline) throw new Error(`${c.name}: no socket after 30 s\n${c.stderr.trim()}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

// ---------------------------------------------------------------- servers and client

async function cliServer(name: string, device: string, sock: string, opts: string[] = []): Promise<Child> {
  const args = [CLI, "serve", "--device", device, "--socket", sock, "--log-level", "warn", "--log-format", "json"];
  for (const o of opts) args.push("--opt", o);
  const c = start(name, process.execPath, args);
  await waitSocket(c, sock);
  return c;
}

async function echoServer(sock: string): Promise<Child> {
  const c = start("node echo", process.execPath, ["--import", "tsx", path.join(BENCH, "echo-server.ts"), sock]);
  await nextLine(c, (l) => l === "listening", 30_000);
  return c;
}

async function cEchoServer(sock: string): Promise<Child> {
  const c = start("c-echo", cEchoBin, [sock]);
  await nextLine(c, (l) => l === "listening", 30_000);
  return c;
}

async function benchServer(device: string, sock: string, opts: string[] = []): Promise<Child> {
  const c = start("bench-server", process.execPath, ["--expose-gc", "--import", "tsx", path.join(BENCH, "bench-server.ts"), device, sock, ...opts]);
  await nextLine(c, (l) => l.includes('"listening"'), 30_000);
  return c;
}

async function control<T = Record<string, number>>(c: Child, line: string): Promise<T> {
  c.proc.stdin!.write(`${line}\n`);
  const r = await nextJson<T & { error?: string }>(c);
  if (r.error) throw new Error(`${c.name}: ${r.error}`);
  return r;
}

let clientBin = "";
let cEchoBin = "";
let havePin = false;

/** The client's command line, pinned to `cpus` with taskset when given. */
function clientCmd(args: string[], cpus: string | null): [string, string[]] {
  return cpus !== null && havePin ? ["taskset", ["-c", cpus, clientBin, ...args]] : [clientBin, args];
}

/** Runs the C client to completion and returns its JSON result. */
async function client<T = Record<string, number>>(args: string[], cpus: string | null = null, timeoutMs = 120_000): Promise<T> {
  const [cmd, a] = clientCmd(args, cpus);
  const c = start(`client ${args.join(" ").slice(0, 60)}`, cmd, a);
  try {
    const r = await nextJson<T>(c, timeoutMs);
    await waitExit(c, timeoutMs);
    return r;
  } finally {
    if (c.exitCode === undefined) await stop(c); // timed out: not left running beside the next cell
  }
}

function pin(pid: number, cpus: string): void {
  if (!havePin) return;
  execFileSync("taskset", ["-a", "-p", "-c", cpus, String(pid)], { stdio: "ignore" });
}

const NCPU = os.cpus().length;
const ALL_CPUS = `0-${NCPU - 1}`;
const CLK_TCK = (() => {
  try {
    return Number(execFileSync("getconf", ["CLK_TCK"]).toString().trim()) || 100;
  } catch {
    return 100;
  }
})();

// ---------------------------------------------------------------- columns

type Col = "cecho" | "lvu" | "ours";
const COLS: Col[] = ["cecho", "lvu", "ours"];

/** One server under test: where it listens, where 4-byte accesses go, how a session runs. */
interface Target {
  col: Col | "node";
  name: string;
  sock: string;
  /** client.c --at REGION:OFFSET */
  at: string[];
  /** client.c lat OP for a 4-byte read */
  readOp: string;
  /** Runs fn with the server serving one connection, its threads pinned to `cpus` (null: all). */
  session<T>(cpus: string | null, fn: (pid: number) => Promise<T>): Promise<T>;
}

function persistent(col: Target["col"], name: string, c: Child, sock: string, readOp = "read"): Target {
  return {
    col,
    name,
    sock,
    at: [],
    readOp,
    async session(cpus, fn) {
      pin(c.pid, cpus ?? ALL_CPUS);
      try {
        return await fn(c.pid);
      } finally {
        pin(c.pid, ALL_CPUS);
      }
    },
  };
}

/** A server that serves one client and exits (libvfio-user's samples): a fresh process per session. */
async function freshSession<T>(name: string, bin: string, args: string[], sock: string, cpus: string | null, fn: (pid: number) => Promise<T>): Promise<T> {
  rmSync(sock, { force: true });
  const c = start(name, bin, args);
  try {
    await waitSocket(c, sock);
    pin(c.pid, cpus ?? ALL_CPUS);
    const r = await fn(c.pid);
    const t = setTimeout(() => c.exitCode === undefined && process.kill(c.pid, "SIGKILL"), 10_000);
    await c.exited;
    clearTimeout(t);
    return r;
  } finally {
    if (c.exitCode === undefined) await stop(c);
  }
}

function lvuTarget(lvu: LvuPeer, sock: string): Target {
  return {
    col: "lvu",
    name: "libvfio-user samples/server",
    sock,
    at: ["--at", "1:0"],
    readOp: "read",
    session: (cpus, fn) => freshSession("libvfio-user server", lvu.server, [sock], sock, cpus, fn),
  };
}

// ---------------------------------------------------------------- results and table

/** Samples per cell, one per round: key `${metric}/${col}`. */
const samples = new Map<string, number[]>();
/** Off while warming up: nothing is recorded. */
let recording = true;
const put = (metric: string, col: string, v: number): void => {
  if (!recording) return;
  const k = `${metric}/${col}`;
  samples.set(k, [...(samples.get(k) ?? []), v]);
};
const med = (metric: string, col: string): number => median(samples.get(`${metric}/${col}`) ?? []);
const all = (metric: string, col: string): number[] => samples.get(`${metric}/${col}`) ?? [];

interface Row {
  name: string;
  cecho: string;
  lvu: string;
  ours: string;
  ratio: string;
  target: string;
  met: string;
}
const rows: Row[] = [];
const notes: string[] = [];
const cellErrors = new Map<string, string>();

const us = (ns: number): string => (Number.isFinite(ns) ? (ns / 1000).toFixed(1) : "n/a");
const fmt = (v: number, digits = 2): string => (Number.isFinite(v) ? v.toFixed(digits) : "n/a");

function row(name: string, cells: Partial<Record<Col, string>>, r = NaN, target = "", met = ""): void {
  rows.push({
    name,
    cecho: cells.cecho ?? "",
    lvu: cells.lvu ?? "",
    ours: cells.ours ?? "",
    ratio: Number.isFinite(r) ? `${fmt(r)}×` : "",
    target,
    met,
  });
}

function printTable(): void {
  const head: Row = { name: "Benchmark", cecho: "C echo", lvu: "libvfio-user", ours: "ours", ratio: "ours/lvu", target: "Target", met: "Met" };
  const cols = ["name", "cecho", "lvu", "ours", "ratio", "target", "met"] as const;
  const rs = [head, ...rows];
  const w = cols.map((k) => Math.max(...rs.map((r) => r[k].length)));
  const line = (r: Row): string => `| ${cols.map((k, i) => r[k].padEnd(w[i]!)).join(" | ")} |`;
  console.log(line(head));
  console.log(`|${w.map((n) => "-".repeat(n + 2)).join("|")}|`);
  for (const r of rows) console.log(line(r));
}

/** Runs one cell; a failure leaves the cell empty (n/a) and one note per distinct error. */
async function cell(what: string, f: () => Promise<void>): Promise<void> {
  try {
    await f();
  } catch (err) {
    const msg = (err as Error).message.split("\n").slice(0, 3).join(" / ").slice(0, 400);
    if (!cellErrors.has(what)) cellErrors.set(what, msg);
  }
}

// ---------------------------------------------------------------- per-round measurements

const N_LAT = QUICK ? 2000 : 20000;
const WARM = QUICK ? 200 : 1000;
const N_CPU = QUICK ? 5000 : 40000;
const N_SYS = QUICK ? 1000 : 3000;
const N_POSTED = QUICK ? 20000 : 200000;
const CHUNK = 1 << 20;

interface Mode {
  key: string;
  label: string;
  srv: string | null;
  cli: string | null;
}
let MODES: Mode[] = [];

async function latencyRound(targets: Target[]): Promise<void> {
  for (const m of MODES) {
    for (const t of targets) {
      await cell(`REGION_READ ${m.key}, ${t.name}`, async () => {
        const r = await t.session(m.srv, () => client([...t.at, "lat", t.sock, t.readOp, String(N_LAT), String(WARM)], m.cli));
        put(`lat.${m.key}.med`, t.col, r.median_ns!);
        put(`lat.${m.key}.p99`, t.col, r.p99_ns!);
      });
    }
  }
  const m = MODES[0]!;
  for (const t of targets) {
    if (t.col === "node") continue;
    await cell(`REGION_WRITE ${m.key}, ${t.name}`, async () => {
      const r = await t.session(m.srv, () => client([...t.at, "lat", t.sock, "write", String(N_LAT), String(WARM)], m.cli));
      put(`latw.med`, t.col, r.median_ns!);
      put(`latw.p99`, t.col, r.p99_ns!);
    });
  }
}

/** user + sys CPU seconds of a process (all threads), from /proc/PID/stat. */
function cpuSeconds(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
  const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return (Number(f[11]) + Number(f[12])) / CLK_TCK;
}

/** On-CPU nanoseconds of all threads of a process (schedstat: exact, not tick-sampled). */
function schedNs(pid: number): number {
  let t = 0;
  try {
    for (const task of readdirSync(`/proc/${pid}/task`)) {
      t += Number(readFileSync(`/proc/${pid}/task/${task}/schedstat`, "utf8").split(" ")[0]);
    }
  } catch {
    return NaN;
  }
  return t;
}

/** A synchronised `lat` client: `during(pid)` runs around exactly the timed loop. */
async function syncedLat<T>(t: Target, n: number, cpus: string | null, around: (pid: number, run: () => Promise<void>) => Promise<T>): Promise<T> {
  return t.session(cpus, async (pid) => {
    const [cmd, a] = clientCmd([...t.at, "lat", t.sock, t.readOp, String(n), "500", "sync"], cpus);
    const c = start("client sync", cmd, a);
    await nextLine(c, (l) => l === "ready");
    const r = await around(pid, async () => {
      c.proc.stdin!.write("\n");
      await nextJson(c);
    });
    c.proc.stdin!.end();
    await waitExit(c);
    return r;
  });
}

async function cpuRound(targets: Target[]): Promise<void> {
  for (const t of targets) {
    await cell(`CPU, ${t.name}`, async () => {
      const r = await syncedLat(t, N_CPU, havePin ? "0" : null, async (pid, run) => {
        const t0 = cpuSeconds(pid);
        const s0 = schedNs(pid);
        await run();
        return { stat: ((cpuSeconds(pid) - t0) / N_CPU) * 1e9, sched: (schedNs(pid) - s0) / N_CPU };
      });
      put("cpu.stat", t.col, r.stat);
      put("cpu.sched", t.col, r.sched);
    });
  }
}

let straceWhy: string | null = null;

async function strace(pid: number, run: () => Promise<void>): Promise<{ calls: number; top: string }> {
  const out = path.join(tmp, `strace-${pid}.txt`);
  rmSync(out, { force: true });
  const s = start("strace", "strace", ["-f", "-c", "-p", String(pid), "-o", out]);
  const deadline = Date.now() + 10_000;
  while (!/attached/.test(s.stderr)) {
    if (s.exitCode !== undefined) throw new Error(`strace failed: ${s.stderr.trim().split("\n")[0]}`);
    if (Date.now() > deadline) throw new Error("strace did not attach");
    await new Promise((r) => setTimeout(r, 20));
  }
  await new Promise((r) => setTimeout(r, 200));
  await run();
  process.kill(s.pid, "SIGINT");
  await s.exited;
  const text = existsSync(out) ? readFileSync(out, "utf8") : "";
  const per: [string, number][] = [];
  let total = NaN;
  for (const l of text.split("\n")) {
    const f = l.trim().split(/\s+/);
    if (f.length < 5 || !/^\d/.test(f[0]!)) continue;
    const name = f[f.length - 1]!;
    const calls = Number(f[3]);
    if (name === "total") total = calls;
    else per.push([name, calls]);
  }
  if (!Number.isFinite(total)) throw new Error("no strace summary");
  per.sort((a, b) => b[1] - a[1]);
  return { calls: total, top: per.slice(0, 4).map(([n, c]) => `${n} ${c}`).join(", ") };
}

const straceTop = new Map<string, string>();

async function syscallRound(targets: Target[]): Promise<void> {
  if (straceWhy !== null) return;
  for (const t of targets) {
    await cell(`syscalls, ${t.name}`, async () => {
      const r = await syncedLat(t, N_SYS, null, (pid, run) => strace(pid, run));
      put("sys", t.col, r.calls / N_SYS);
      straceTop.set(t.col, r.top);
    });
  }
}

async function postedRound(targets: Target[]): Promise<void> {
  for (const t of targets) {
    await cell(`posted, ${t.name}`, async () => {
      const cpus = havePin ? "0" : null;
      const r = await t.session(cpus, () => client([...t.at, "posted", t.sock, String(N_POSTED), "64"], cpus));
      put("posted", t.col, r.msgs_per_s!);
    });
  }
}

interface MigPeers {
  cecho: string;
  lvuBig: string | null;
  oursSrc: Child;
  oursDst: Child;
  oursSrcSock: string;
  oursDstSock: string;
  lvuSocks: [string, string];
}

function putMig(col: Col, r: Record<string, number>): void {
  put("mig.read", col, r.read_gbps!);
  put("mig.write", col, r.write_gbps!);
  put("mig.bytes", col, r.bytes!);
  put("mig.s2sc", col, r.stop_to_stop_copy_ns! / 1e6);
  put("mig.sc2s", col, r.stop_copy_to_stop_ns! / 1e6);
  put("mig.s2r", col, r.stop_to_resuming_ns! / 1e6);
  put("mig.r2s", col, r.resuming_to_stop_ns! / 1e6);
}

async function migRound(p: MigPeers): Promise<void> {
  const cpus = havePin ? "0" : null;
  const args = (a: string, b: string): string[] => ["migrw", a, b, String(CHUNK)];
  await cell("migration, C echo", async () => {
    pin(cEcho!.pid, cpus ?? ALL_CPUS);
    try {
      putMig("cecho", await client(args(p.cecho, p.cecho), cpus, 60_000));
    } finally {
      pin(cEcho!.pid, ALL_CPUS);
    }
  });
  if (p.lvuBig) {
    const [s1, s2] = p.lvuSocks;
    const big = p.lvuBig;
    await cell("migration, lvu_big", () =>
      freshSession("lvu_big source", big, [s1, "256"], s1, cpus, () =>
        freshSession("lvu_big destination", big, [s2, "256"], s2, cpus, async () => {
          putMig("lvu", await client(args(s1, s2), cpus, 60_000));
        }),
      ),
    );
  }
  await cell("migration, ours", async () => {
    for (const c of [p.oursSrc, p.oursDst]) pin(c.pid, cpus ?? ALL_CPUS);
    try {
      putMig("ours", await client(args(p.oursSrcSock, p.oursDstSock), cpus, 60_000));
    } finally {
      for (const c of [p.oursSrc, p.oursDst]) pin(c.pid, ALL_CPUS);
    }
  });
}

let cEcho: Child | null = null;

// ---------------------------------------------------------------- measured once (several repetitions inside)

async function downtimeRow(a: string, b: string): Promise<void> {
  const permille = 10;
  const runs = QUICK ? 1 : 3;
  const res: Record<string, number>[] = [];
  // the roles alternate: each destination runs the migrated device and is the next source
  for (let i = 0; i < runs; i++) {
    const [src, dst] = i % 2 === 0 ? [a, b] : [b, a];
    res.push(await client(["downtime", src, dst, String(CHUNK), String(permille)]));
  }
  const r = [...res].sort((x, y) => x.downtime_ms! - y.downtime_ms!)[res.length >> 1]!;
  const rts = r.downtime_rts!;
  const floorMs = (rts * med("lat.unpinned.med", "cecho")) / 1e6;
  row(
    "Two-server migration downtime, bigmem 256 MiB, 1% dirtied: ms",
    { cecho: `${fmt(floorMs, 3)} (${rts} RTTs)`, lvu: "n/a (a)", ours: fmt(r.downtime_ms!) },
    NaN,
    "< 20 ms",
    verdict(r.downtime_ms!, 20, "<="),
  );
  const verified = res.every((x) => (x as unknown as { verified: boolean }).verified);
  notes.push(
    `Downtime (C client, two CLI bigmem servers, unpinned): time from the STOP_COPY request → read to the end (each chunk written to the destination, ` +
      `in RESUMING since before pre-copy) → destination STOP → RUNNING. Median of ${runs} runs (${res.map((x) => fmt(x.downtime_ms!)).join(", ")} ms; ` +
      `roles alternate). Median run: SET STOP_COPY ${fmt(r.set_stop_copy_ms!)} ms, drain ${fmt(r.drain_ms!)} ms (${r.stopcopy_bytes} B), ` +
      `destination STOP ${fmt(r.dst_stop_ms!)} ms, RUNNING ${fmt(r.dst_running_ms!)} ms; pre-copy moved ` +
      `${(r.precopy_bytes! / 2 ** 20).toFixed(1)} MiB in ${fmt(r.precopy_ms!, 0)} ms, then ${r.dirtied} pages were dirtied by posted writes ` +
      `to BAR2. Destination ${verified ? "holds" : "does NOT hold"} the last dirtied word. C echo: the downtime's ${rts} round trips at the C echo's ` +
      `unpinned median RTT. (a) lvu_big has no dirty tracking (its STOP_COPY resends the whole buffer) and samples/server's state is 16 KiB, ` +
      `so libvfio-user has no like-for-like figure.`,
  );
}

interface DmaLogClient {
  col: Col;
  c: Child;
  ready: Record<string, number>;
}

/** DMA_LOGGING_REPORT over 16 GiB: all three columns with nothing dirty, interleaved; then ours with pages dirtied. */
async function dmaLogRows(bench: Child, benchSock: string, cechoSock: string, lvu: LvuPeer | null, lvuSock: string): Promise<void> {
  const reps = QUICK ? 3 : 9;
  const ratios = [0.001, 0.1];
  const open = async (col: Col, sock: string, n: number): Promise<DmaLogClient> => {
    const c = start(`client dmalog ${col}`, clientBin, ["dmalog", sock, "16", String(n)]);
    return { col, c, ready: await nextJson(c) };
  };
  const report = async (d: DmaLogClient): Promise<Record<string, number>> => {
    d.c.proc.stdin!.write("report\n");
    return nextJson(d.c);
  };
  const run = async (lvuPid: number | null): Promise<void> => {
    const cls: DmaLogClient[] = [await open("cecho", cechoSock, reps + 1)];
    if (lvuPid !== null) cls.push(await open("lvu", lvuSock, reps + 1));
    const ours = await open("ours", benchSock, reps + 1 + 1 + ratios.length * reps);
    cls.push(ours);
    for (const d of cls) await report(d); // warm-up
    for (let i = 0; i < reps; i++) {
      for (const d of cls) put("dmalog.0", d.col, (await report(d)).report_ns! / 1e6);
    }
    for (const d of cls) if (d !== ours) {
      d.c.proc.stdin!.end();
      await waitExit(d.c);
    }
    // ours with pages dirtied inside the server (bench-server.ts: DirtyLog.markDirty)
    await control(bench, "dirty 0.001 99");
    await report(ours);
    for (const r of ratios) {
      for (let i = 0; i < reps; i++) {
        const want = (await control(bench, `dirty ${r} ${i * 7 + 1}`)).dirtied!;
        const got = await report(ours);
        put(`dmalog.${r}`, "ours", got.report_ns! / 1e6);
        if (got.dirty_pages !== want) notes.push(`DMA_LOGGING_REPORT ${r * 100}%: the bitmap held ${got.dirty_pages} pages, ${want} were dirtied.`);
      }
    }
    ours.c.proc.stdin!.end();
    await waitExit(ours.c);
    notes.push(
      `DMA_LOGGING_REPORT: a sparse 16 GiB memfd DMA_MAPped (nothing touched), LOGGING_START at 4 KiB (${ours.ready.bitmap_bytes} B bitmap), ` +
        `then REPORT round trips over all of it, timed in the C client, ${reps} per column interleaved after a warm-up (memcpy of the bitmap ` +
        `in the client: ${fmt(ours.ready.memcpy_ns! / 1e3, 1)} µs). Ours: bench-server.ts (the real server); pages are dirtied inside it ` +
        `through DirtyLog.markDirty (what its DMA engine calls), driven over its stdin, for the 0.1% and 10% rows; popcount checked.`,
    );
  };
  if (lvu) await freshSession("libvfio-user server", lvu.server, [lvuSock], lvuSock, null, (pid) => run(pid));
  else await run(null);
}

async function dmaRows(srv: Child, sock: string): Promise<void> {
  const mib = 64;
  const reps = QUICK ? 2 : 5;
  const copy = await control(srv, `memcpy ${mib << 20} 9`);
  const base = Math.max(copy.one_gbps!, copy.chunked_gbps!);
  for (const mode of ["mmap", "socket"] as const) {
    await control(srv, "idle");
    const r = await client(["dma", sock, mode, String(mib), String(reps)]);
    row(`Device DMA → guest, ${mib} MiB, ${mode === "mmap" ? "fd-backed DMA_MAP (mmap)" : "DMA_WRITE messages (no fd)"}: GB/s`, { ours: `${fmt(r.gbps!)} (Buffer.copy ${fmt(base)})` });
    if (mode === "socket") notes.push(`DMA over the socket: ${r.dma_msgs} DMA_WRITE messages for ${reps + 1} device→guest runs (1 MiB each).`);
  }
  notes.push(
    `Device DMA (ours only: the peers have no DMA engine): bigmem's engine copies ${mib} MiB of device memory to guest memory, median of ${reps} ` +
      `after a warm-up; in brackets Buffer.copy of the same ${mib} MiB in the same server process (best of one copy and 1 MiB copies).`,
  );
}

/** 65,535 DMA_MAPs (the default max_dma_maps), then unmaps with the table full (test/bench/dma-maps.ts). */
async function dmaMapRows(targets: { col: Col; sock: string; pid: number }[]): Promise<void> {
  const res = new Map<Col, Awaited<ReturnType<typeof fillDmaTable>> & { cpuMs: number }>();
  for (const t of targets) {
    await cell(`DMA_MAP, ${t.col}`, async () => {
      const cpu0 = schedNs(t.pid);
      const r = await fillDmaTable(t.sock, MAX_DMA_MAPS);
      res.set(t.col, { ...r, cpuMs: (schedNs(t.pid) - cpu0) / 1e6 });
    });
  }
  const c = (f: (r: NonNullable<ReturnType<typeof res.get>>) => string): Partial<Record<Col, string>> => {
    const o: Partial<Record<Col, string>> = { lvu: "n/a (b)" };
    for (const [k, v] of res) o[k] = f(v);
    return o;
  };
  const ours = res.get("ours");
  row(`DMA_MAP ×${MAX_DMA_MAPS}, fd-less 4 KiB regions (fill the table): s`, c((r) => fmt(r.fillMs / 1000)), NaN, "seconds, not minutes", ours ? verdict(ours.fillMs, 60_000, "<=") : "");
  row("DMA_MAP near the limit (last 1024 maps): µs per map", c((r) => fmt(r.lastMapUs, 1)));
  row("DMA_UNMAP with the table full (1024 highest regions): µs per unmap", c((r) => fmt(r.fullUnmapUs, 1)));
  notes.push(
    `DMA_MAP: ${MAX_DMA_MAPS} fd-less 4 KiB regions with 4 KiB gaps, pipelined 256 at a time by a Node client over our native transport ` +
      `(client cost included, the same for each column); server CPU for the whole fill: ${[...res].map(([k, v]) => `${k} ${fmt(v.cpuMs, 0)} ms`).join(", ")}; ` +
      `refused: ${[...res].map(([k, v]) => `${k} ${v.refused}`).join(", ")}. (b) libvfio-user's samples/server keeps its maps in a ` +
      `96-entry table (NR_DMA_REGIONS) and exits when it is full; lvu_big has no DMA.`,
  );
}

async function qemuRows(): Promise<void> {
  const name = "QEMU-driven downtime, bigmem 256 MiB, limit 5 ms";
  const skip = (why: string): void => {
    row(name, { ours: "skipped" });
    notes.push(`QEMU-driven downtime: skipped: ${why}.`);
  };
  if (NO_QEMU) return skip("--no-qemu");
  if (!existsSync(path.join(BENCH, "qemu-downtime.ts"))) return skip("no test/bench/qemu-downtime.ts");
  const { qemuDowntimeRows } = await import("./qemu-downtime.ts");
  const r = await qemuDowntimeRows({ limitMs: 5, size: "256M", runs: 1 });
  if ("skipped" in r) return skip(r.skipped);
  for (const d of r.rows) {
    row(`QEMU-driven downtime, bigmem 256 MiB, ${d.workload}: ms`, { ours: `${d.downtimeMs}${d.status !== "completed" ? ` (${d.status})` : ""}` }, NaN, "(QEMU's limit: 5 ms)");
    notes.push(
      `QEMU-driven (${d.workload}): total ${d.totalMs} ms, ${d.dirtySyncs} dirty syncs, device ${d.deviceMiB.toFixed(1)} MiB, ${d.writes} BAR2 writes during pre-copy ` +
        `(qemu-downtime.ts: the migrating QEMU, downtime as QEMU reports it; ours only: QEMU's vfio-user client with libvfio-user was not set up).`,
    );
  }
}

// ---------------------------------------------------------------- the table from the rounds

function roundRows(haveLvu: boolean): void {
  const lvuNa = haveLvu ? "n/a" : "not built";
  const cells = (metric: string, f: (v: number, col: Col) => string): Partial<Record<Col, string>> => {
    const o: Partial<Record<Col, string>> = {};
    for (const c of COLS) {
      const v = med(metric, c);
      o[c] = Number.isFinite(v) ? f(v, c) : c === "lvu" ? lvuNa : "n/a";
    }
    return o;
  };
  const vs = (metric: string): number => ratio(med(metric, "ours"), med(metric, "lvu"));
  for (const m of MODES) {
    const r = vs(`lat.${m.key}.med`);
    const target = m.key === MODES[0]!.key && m.key === "1cpu";
    row(
      `REGION_READ 4 B round trip, ${m.label}: median / p99 µs`,
      cells(`lat.${m.key}.med`, (v, c) => `${us(v)} / ${us(med(`lat.${m.key}.p99`, c))}`),
      r,
      target ? "≤ 1.1× lvu" : "",
      target ? verdict(r, 1.1, "<=") : "",
    );
  }
  for (const m of MODES) {
    const v = med(`lat.${m.key}.med`, "node");
    if (Number.isFinite(v)) row(`  Node echo (diagnostic: our native transport, no dispatch), ${m.label}`, { ours: `${us(v)} / ${us(med(`lat.${m.key}.p99`, "node"))}` }, NaN);
  }
  row(`REGION_WRITE 4 B round trip, ${MODES[0]!.label}: median / p99 µs`, cells("latw.med", (v, c) => `${us(v)} / ${us(med("latw.p99", c))}`), vs("latw.med"));
  const cpuR = vs("cpu.stat");
  row("Server CPU per REGION_READ, 1 CPU (/proc/PID/stat utime+stime): µs", cells("cpu.stat", (v) => fmt(v / 1000)), cpuR, "≤ 1.2× lvu", verdict(cpuR, 1.2, "<="));
  if (straceWhy === null) row("Server syscalls per REGION_READ (strace -c -f)", cells("sys", (v) => fmt(v)), vs("sys"));
  else row("Server syscalls per REGION_READ (strace -c -f)", { cecho: "n/a", lvu: "n/a", ours: "n/a" });
  const postR = vs("posted");
  row("Posted REGION_WRITE 4 B (NO_REPLY), batches of 64, 1 CPU: k msgs/s", cells("posted", (v) => (v / 1e3).toFixed(0)), postR, "≥ 2× lvu", verdict(postR, 2, ">="));
  const readR = vs("mig.read");
  row("MIG_DATA_READ 256 MiB, 1 MiB reads, 1 CPU: GB/s (lvu: lvu_big)", cells("mig.read", (v) => fmt(v)), readR, "≥ 1.0× lvu_big", verdict(readR, 1, ">="));
  const wOverR = ratio(med("mig.write", "ours"), med("mig.read", "ours"));
  row(
    "MIG_DATA_WRITE 256 MiB, 1 MiB writes, 1 CPU: GB/s (lvu: lvu_big)",
    cells("mig.write", (v) => fmt(v)),
    vs("mig.write"),
    `≥ 0.8× our READ (${fmt(wOverR)}×)`,
    verdict(wOverR, 0.8, ">="),
  );
  const trans: [string, string, boolean][] = [
    ["mig.s2sc", "STOP → STOP_COPY", true],
    ["mig.sc2s", "STOP_COPY → STOP (after the whole stream was read)", true],
    ["mig.s2r", "STOP → RESUMING", false],
    ["mig.r2s", "RESUMING → STOP (after the whole stream was written)", true],
  ];
  for (const [k, label, target] of trans) {
    const ours = med(k, "ours");
    row(`${label}, 256 MiB: ms`, cells(k, (v) => fmt(v, 3)), vs(k), target ? "≤ 0.5 ms" : "", target ? verdict(ours, 0.5, "<=") : "");
  }
}

function roundNotes(haveLvu: boolean): void {
  const per = (metric: string, col: string, f: (v: number) => string): string => all(metric, col).map(f).join(", ");
  const m0 = MODES[0]!;
  notes.push(
    `Rounds: ${ROUNDS}; each round runs every cell once, column after column (C echo, libvfio-user, ours${MODES.length ? ", Node echo" : ""}), ` +
      `then the next row. Cells are medians over the rounds (for round trips: the median of each run's median and of each run's p99, ` +
      `${N_LAT} round trips per run after ${WARM} warm-up). ours/lvu is the ratio of the two medians. ` +
      `REGION_READ per round, ${m0.key}: C echo ${per(`lat.${m0.key}.med`, "cecho", us)}; lvu ${per(`lat.${m0.key}.med`, "lvu", us)}; ` +
      `ours ${per(`lat.${m0.key}.med`, "ours", us)} µs.`,
  );
  notes.push(
    `Where 4-byte accesses go: ours edu BAR0 0x04 (liveness register: a handler call); libvfio-user samples/server BAR1 offset 0 ` +
      `(its BAR0 takes only 8-byte accesses; BAR1 is a memcpy from a mmap'd file); C echo answers without looking. Pinning (taskset; the ` +
      `server with -a, all threads): 1 CPU = client and server on CPU 0; 2 CPUs = client on CPU 0, server on CPU 1 (every round trip wakes a task on the other vCPU: most of that figure is the ` +
      `VM's cross-CPU wake-up); unpinned = the scheduler's choice, so a column may land on either pattern in a given run.`,
  );
  notes.push(
    `CPU: ${N_CPU} REGION_READ round trips on 1 CPU, utime+stime from /proc/PID/stat (all threads, ${CLK_TCK} ticks/s) around the timed loop ` +
      `(libvfio-user: a fresh samples/server per run). The same window from /proc/PID/task/*/schedstat (ns, not tick-sampled): ` +
      COLS.map((c) => `${c} ${fmt(med("cpu.sched", c) / 1000)} µs`).join(", ") + ".",
  );
  if (straceWhy !== null) notes.push(`Syscalls: n/a, ${straceWhy}.`);
  else {
    notes.push(
      `Syscalls: strace -c -f -p PID attached to the server (all threads) for ${N_SYS} round trips after the warm-up, unpinned; calls / round trips ` +
        `(includes one blocked wait as the window closes). Top calls in the last round — ${COLS.map((c) => `${c}: ${straceTop.get(c) ?? "n/a"}`).join("; ")}.`,
    );
  }
  notes.push(
    `Posted writes: ${N_POSTED} 36-byte REGION_WRITEs with NO_REPLY (64 per sendmsg), then one REGION_READ as a fence (replies are in order), ` +
      `client and server on CPU 0.`,
  );
  notes.push(
    `Migration (client.c migrw, after one untimed warm-up migration per column; one connection to each side): source STOP → STOP_COPY, MIG_DATA_READ of 1 MiB until an empty reply into the ` +
      `client's memory, STOP_COPY → STOP; destination STOP → RESUMING, the same chunks as MIG_DATA_WRITEs, RESUMING → STOP (ours: the device loads ` +
      `and checks the stream). Read and write times are the sums of the round trips (the client's copy into its buffer is not counted). ` +
      `Ours: bigmem 256 MiB (BAR2 filled with a pattern), stream ${fmt(med("mig.bytes", "ours") / 2 ** 20, 3)} MiB; lvu: two fresh lvu_big 256 processes ` +
      `(${fmt(med("mig.bytes", "lvu") / 2 ** 20, 3)} MiB); C echo: 256 MiB from a pattern buffer, writes acknowledged unread. Client and servers on CPU 0: ` +
      `libvfio-user reads a message body with one recv() without MSG_WAITALL and drops the connection on a short read, so a 1 MiB MIG_DATA_WRITE ` +
      `must be queued whole before it wakes (the client also raises its send buffer to 4 MiB); every column runs the same way. ` +
      `Per round, ours — MIG_DATA_READ ${per("mig.read", "ours", (v) => fmt(v))} GB/s (lvu ${per("mig.read", "lvu", (v) => fmt(v))}); ` +
      `MIG_DATA_WRITE ${per("mig.write", "ours", (v) => fmt(v))} GB/s; STOP → STOP_COPY ${per("mig.s2sc", "ours", (v) => fmt(v, 2))} ms; ` +
      `RESUMING → STOP ${per("mig.r2s", "ours", (v) => fmt(v, 2))} ms.`,
  );
  if (!haveLvu) notes.push("libvfio-user column: not built (see the first note).");
}

// ---------------------------------------------------------------- main

async function main(): Promise<void> {
  const t0 = Date.now();
  const load0 = loadavg();
  tmp = mkdtempSync(path.join(os.tmpdir(), "vfio-bench-"));
  clientBin = path.join(tmp, "client");
  cEchoBin = path.join(tmp, "c-echo");
  execFileSync("cc", ["-O2", "-o", clientBin, path.join(BENCH, "client.c")], { stdio: ["ignore", "ignore", "inherit"] });
  execFileSync("cc", ["-O2", "-o", cEchoBin, path.join(BENCH, "c-echo.c")], { stdio: ["ignore", "ignore", "inherit"] });
  try {
    execFileSync("taskset", ["-c", "0", "true"], { stdio: "ignore" });
    havePin = true;
  } catch {
    havePin = false;
  }
  MODES = havePin
    ? [
        { key: "1cpu", label: "1 CPU", srv: "0", cli: "0" },
        ...(NCPU >= 2 ? [{ key: "2cpu", label: "2 CPUs (client 0, server 1)", srv: "1", cli: "0" }] : []),
        { key: "unpinned", label: "unpinned", srv: null, cli: null },
      ]
    : [{ key: "unpinned", label: "unpinned", srv: null, cli: null }];
  if (!havePin) notes.push("taskset not found: every row runs unpinned, the 1- and 2-CPU rows are skipped.");

  let lvu: LvuPeer | null = null;
  if (NO_PEERS) notes.push("libvfio-user: --no-peers.");
  else {
    const r = ensureLvu(ROOT, (l) => console.error(l));
    if ("why" in r) notes.push(`libvfio-user column: ${r.why}.`);
    else {
      lvu = r;
      notes.push(`libvfio-user efd091b (${r.how}, ${r.dir}; bar1_size 0x3000 → 0x4000 in that scratch copy, upstream issue #871).`);
    }
  }
  straceWhy = (() => {
    try {
      execFileSync("strace", ["-V"], { stdio: "ignore" });
      return null;
    } catch {
      return "strace is not installed (apt-get install -y strace)";
    }
  })();

  const sock = (n: string): string => path.join(tmp, `${n}.sock`);
  const [edu, echo, ce, bigA, bigB, bigC, bench] = await Promise.all([
    cliServer("edu server", "edu", sock("edu")),
    echoServer(sock("echo")),
    cEchoServer(sock("cecho")),
    cliServer("bigmem server A", "bigmem", sock("bigA"), ["size=256M"]),
    cliServer("bigmem server B", "bigmem", sock("bigB"), ["size=256M"]),
    cliServer("bigmem server C", "bigmem", sock("bigC"), ["size=256M"]),
    benchServer("bigmem", sock("bench"), ["size=64M"]),
  ]);
  cEcho = ce;
  // device memory as real data (a pattern), not zero pages nobody touched: what a migration moves
  const fills = await Promise.all([sock("bigA"), sock("bigB")].map((sk, i) => client(["fill", sk, "2", "256", String(i + 1)])));
  notes.push(`bigmem BAR2 of the migration sources filled with a pattern first (256 MiB in 1 MiB REGION_WRITEs: ${fills.map((f) => fmt(f.ns! / 1e6, 0)).join(", ")} ms).`);

  const cecho = persistent("cecho", "C echo", ce, sock("cecho"));
  const ours = persistent("ours", "ours (edu)", edu, sock("edu"));
  const node = persistent("node", "Node echo", echo, sock("echo"), "echo");
  const three = [cecho, ...(lvu ? [lvuTarget(lvu, sock("lvu"))] : []), ours];
  const mig: MigPeers = {
    cecho: sock("cecho"),
    lvuBig: lvu?.big ?? null,
    oursSrc: bigA,
    oursDst: bigB,
    oursSrcSock: sock("bigA"),
    oursDstSock: sock("bigB"),
    lvuSocks: [sock("lvuA"), sock("lvuB")],
  };
  // one untimed migration per column first: JIT, first touch of buffers and of the destination's memory
  console.error(`warm-up (load ${loadavg()})`);
  recording = false;
  await migRound(mig);
  recording = true;
  cellErrors.clear();
  for (let r = 0; r < ROUNDS; r++) {
    console.error(`round ${r + 1}/${ROUNDS} (load ${loadavg()})`);
    await latencyRound([...three, node]);
    await cpuRound(three);
    await syscallRound(three);
    await postedRound(three);
    await migRound(mig);
  }
  roundRows(lvu !== null);
  roundNotes(lvu !== null);

  const guard = async (name: string, f: () => Promise<void>): Promise<void> => {
    try {
      await f();
    } catch (err) {
      row(name, { ours: "error" });
      notes.push(`${name}: ${(err as Error).message.split("\n").slice(0, 3).join(" / ")}`);
    }
  };
  console.error("downtime, DMA logging, device DMA, DMA maps ...");
  await guard("Two-server migration downtime", () => downtimeRow(sock("bigB"), sock("bigC")));
  await Promise.all([stop(bigA), stop(bigB), stop(bigC)]);
  await guard("DMA_LOGGING_REPORT", async () => {
    await dmaLogRows(bench, sock("bench"), sock("cecho"), lvu, sock("lvu"));
    const lr = ratio(med("dmalog.0", "ours"), med("dmalog.0", "lvu"));
    const c: Partial<Record<Col, string>> = {};
    for (const k of COLS) c[k] = fmt(med("dmalog.0", k), 3);
    if (!lvu) c.lvu = "not built";
    row("DMA_LOGGING_REPORT 16 GiB at 4 KiB, nothing dirty: ms", c, lr, "< 5 ms", verdict(med("dmalog.0", "ours"), 5, "<="));
    for (const r of [0.001, 0.1]) {
      const o = med(`dmalog.${r}`, "ours");
      row(`DMA_LOGGING_REPORT 16 GiB at 4 KiB, ${r * 100}% dirty: ms`, { ours: fmt(o, 3) }, NaN, "< 5 ms", verdict(o, 5, "<="));
    }
  });
  await guard("Device DMA", () => dmaRows(bench, sock("bench")));
  await guard("DMA_MAP ×65,535", () =>
    dmaMapRows([
      { col: "cecho", sock: sock("cecho"), pid: ce.pid },
      { col: "ours", sock: sock("edu"), pid: edu.pid },
    ]),
  );
  await guard("QEMU-driven downtime", () => qemuRows());

  for (const c of [edu, echo, ce, bench]) await stop(c);
  for (const c of [edu, echo, ce, bigA, bigB, bigC, bench]) {
    const warn = c.stderr.trim();
    if (warn) notes.push(`${c.name} logged: ${warn.split("\n").slice(-3).join(" | ").slice(0, 400)}`);
  }
  for (const [what, msg] of cellErrors) notes.push(`failed cell (left n/a): ${what}: ${msg}`);

  const cpu = os.cpus()[0]?.model ?? "?";
  console.log(
    `vfio-user-ts bench — ${NCPU} × ${cpu}, Linux ${os.release()}, Node ${process.version}, ${ROUNDS} round${ROUNDS === 1 ? "" : "s"}` +
      `${QUICK ? " (--quick: short runs)" : ""}\nload average (1, 5, 15 min): ${load0} at the start, ${loadavg()} at the end\n`,
  );
  printTable();
  console.log("");
  console.log("ours/lvu: for times (µs, ms) above 1 is slower than libvfio-user; for rates (msgs/s, GB/s) below 1 is slower. Targets are checked on medians.");
  for (const n of notes) console.log(`- ${n}`);
  console.log(`\n(total ${((Date.now() - t0) / 1000).toFixed(1)} s)`);
}

main().then(
  () => {
    cleanup();
  },
  (err: unknown) => {
    console.error(`bench failed: ${(err as Error).stack ?? err}`);
    cleanup();
    process.exitCode = 1;
  },
);

/**
 * Our vfio-user server for end-to-end tests, two ways:
 *
 * - `startServer`: in this process (`VfioUserServer`), so a test can look
 *   at the endpoint's state directly. Its log goes to memory (JSON lines,
 *   parsed on demand) and, with `VFIO_USER_E2E_LOG=1`, to stderr too.
 * - `spawnCliServer`: the `vfio-user-ts serve` command as a separate
 *   process, as a user would run it.
 *
 * Both listen inside a shared directory (see shared-dir.ts) so that QEMU,
 * chrooted into the trixie root, can connect.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { pino, type Logger } from "pino";
import type { Device } from "../../../src/device/api.ts";
import { VfioUserServer, type ServerOptions } from "../../../src/server/server.ts";
import { REPO_ROOT, type SharedDir } from "./shared-dir.ts";

/** One parsed pino line (`msg`, `level`, `time` and the fields the server logged). */
export interface LogRecord {
  level: number;
  msg: string;
  time?: number;
  [field: string]: unknown;
}

/** Commands a migration sends by the hundred thousand; their trace lines are the first to go. */
const BULK = /"cmd":"(MIG_DATA_READ|MIG_DATA_WRITE|REGION_READ|REGION_WRITE|DEVICE_FEATURE|MIG_GET_PRECOPY_INFO)"/;

function isBulkTrace(line: string): boolean {
  return line.includes('"msg":"send"') || (line.includes('"msg":"recv"') && BULK.test(line));
}

/**
 * An in-memory log sink with helpers to query it. Marks (`length`) count
 * every line ever written, so a mark stays valid when old lines are let go.
 * Beyond `cap` lines the oldest per-message trace lines (every `send`, the
 * `recv` of the bulk commands) go first: a long migration traces hundreds of thousands of messages, and
 * the lines tests look for (states, refusals, warnings) must outlive them.
 */
export class LogCapture {
  private lines: string[] = [];
  /** seqs[i]: the sequence number of lines[i] (ascending). */
  private seqs: number[] = [];
  private next = 0;
  private readonly cap: number;
  private readonly echo: boolean;

  constructor(cap = 200_000, echo = process.env.VFIO_USER_E2E_LOG === "1") {
    this.cap = cap;
    this.echo = echo;
  }

  /** pino's destination interface. */
  write(s: string): void {
    for (const line of s.split("\n")) {
      if (line === "") continue;
      this.lines.push(line);
      this.seqs.push(this.next++);
      if (this.echo) process.stderr.write(`[server] ${line}\n`);
    }
    if (this.lines.length > this.cap) this.shed();
  }

  /** Drops trace lines from the older half, then (if still over) the oldest lines. */
  private shed(): void {
    const half = this.lines.length >>> 1;
    const keepLines: string[] = [];
    const keepSeqs: number[] = [];
    for (let i = 0; i < this.lines.length; i++) {
      const l = this.lines[i]!;
      if (i < half && isBulkTrace(l)) continue;
      keepLines.push(l);
      keepSeqs.push(this.seqs[i]!);
    }
    const over = keepLines.length - this.cap;
    this.lines = over > 0 ? keepLines.slice(over) : keepLines;
    this.seqs = over > 0 ? keepSeqs.slice(over) : keepSeqs;
  }

  /** Number of lines written so far (use as a mark for `raw`/`records`). */
  get length(): number {
    return this.next;
  }

  /** Raw lines kept, optionally only those written at or after `mark`. */
  raw(mark = 0): string[] {
    let lo = 0;
    let hi = this.seqs.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.seqs[mid]! < mark) lo = mid + 1;
      else hi = mid;
    }
    return this.lines.slice(lo);
  }

  /** Parsed records after `mark` (unparseable lines become `{ msg: line }`). */
  records(mark = 0): LogRecord[] {
    return this.raw(mark).map(parseLine);
  }

  /** The last `n` lines, for error messages. */
  tail(n = 40): string {
    return this.lines.slice(-n).join("\n");
  }

  clear(): void {
    this.lines = [];
    this.seqs = [];
  }
}

export function parseLine(line: string): LogRecord {
  try {
    const v = JSON.parse(line) as unknown;
    if (v !== null && typeof v === "object") return v as LogRecord;
  } catch {
    // not JSON
  }
  return { level: 30, msg: line };
}

/** Messages received (`recv` trace records) with this command name, after `mark`. */
export function received(records: readonly LogRecord[], cmd: string): LogRecord[] {
  return records.filter((r) => r.msg === "recv" && r.cmd === cmd);
}

export interface ServerHandle {
  readonly server: VfioUserServer;
  /** Host path of the listening socket (pass to startQemu's vfioUserSocket). */
  readonly socketPath: string;
  readonly log: LogCapture;
  /** Records at level warn (40) or above, after `mark`. */
  problems(mark?: number): LogRecord[];
  close(): void;
}

export interface StartServerOptions {
  dir: SharedDir;
  device: Device;
  /** Socket file name inside `dir` (default `<device.type>.sock`). */
  name?: string;
  /** Log every message (default true: tests look for commands in the log). */
  trace?: boolean;
  /** pino level (default debug). */
  level?: pino.LevelWithSilent;
  /** Handlers that replace the server's own (a test's fault on one command). */
  handlers?: ServerOptions["handlers"];
  migration?: ServerOptions["migration"];
  conformance?: ServerOptions["conformance"];
  faults?: ServerOptions["faults"];
}

/** Start a `VfioUserServer` in this process, listening in `dir`. */
export function startServer(opts: StartServerOptions): ServerHandle {
  const capture = new LogCapture();
  const log: Logger = pino({ level: opts.level ?? "debug", base: undefined }, capture);
  const socketPath = join(opts.dir.host, opts.name ?? `${opts.device.type}.sock`);
  const server = new VfioUserServer({ device: opts.device, log, trace: opts.trace ?? true, handlers: opts.handlers, migration: opts.migration, conformance: opts.conformance, faults: opts.faults });
  server.listen(socketPath);
  let closed = false;
  return {
    server,
    socketPath,
    log: capture,
    problems: (mark = 0) => capture.records(mark).filter((r) => r.level >= 40),
    close() {
      if (closed) return;
      closed = true;
      server.close();
    },
  };
}

export const CLI_PATH = join(REPO_ROOT, "src/cli/vfio-user-ts.mjs");

export interface CliServer {
  readonly proc: ChildProcess;
  readonly socketPath: string;
  /** Spawn to the "serving" line on stdout, ms. */
  readonly startMs: number;
  stdout(): string;
  /** The server's log (JSON lines on stderr). */
  stderr(): string;
  /** The same log, line by line (marks and parsed records, as for an in-process server). */
  readonly log: LogCapture;
  /** Records at level warn (40) or above, after `mark`. */
  problems(mark?: number): LogRecord[];
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /** SIGTERM (the CLI's clean shutdown), SIGKILL after `killAfterMs`. Idempotent. */
  stop(killAfterMs?: number): Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

const liveCli = new Set<ChildProcess>();
let cliExitHook = false;

/**
 * Run `vfio-user-ts serve --device DEVICE --socket PATH` as its own process
 * and wait until it says it is serving. Extra CLI arguments go in `args`.
 */
export async function spawnCliServer(opts: {
  dir: SharedDir;
  device?: string;
  name?: string;
  args?: string[];
  timeoutMs?: number;
}): Promise<CliServer> {
  if (!existsSync(CLI_PATH)) throw new Error(`CLI ${CLI_PATH} does not exist`);
  const socketPath = join(opts.dir.host, opts.name ?? "cli.sock");
  const args = [CLI_PATH, "serve", "--device", opts.device ?? "edu", "--socket", socketPath, "--log-format", "json", ...(opts.args ?? [])];
  if (!cliExitHook) {
    cliExitHook = true;
    process.on("exit", () => {
      for (const p of liveCli) p.kill("SIGKILL");
    });
  }
  const t0 = performance.now();
  const proc = spawn(process.execPath, args, { cwd: REPO_ROOT, stdio: ["ignore", "pipe", "pipe"] });
  liveCli.add(proc);
  let out = "";
  let err = "";
  const capture = new LogCapture(200_000, false);
  let partial = "";
  proc.stdout!.setEncoding("utf8");
  proc.stderr!.setEncoding("utf8");
  proc.stderr!.on("data", (s: string) => {
    err = (err + s).slice(-1 << 20);
    // whole lines only: a pipe may split one
    const nl = s.lastIndexOf("\n");
    if (nl < 0) {
      partial += s;
    } else {
      capture.write(partial + s.slice(0, nl + 1));
      partial = s.slice(nl + 1);
    }
    if (process.env.VFIO_USER_E2E_LOG === "1") process.stderr.write(s.replace(/^(?=.)/gm, "[cli] "));
  });
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    proc.on("close", (code, signal) => {
      liveCli.delete(proc);
      resolve({ code, signal });
    });
    proc.on("error", (e) => {
      err += `\n[spawn error: ${e.message}]`;
      liveCli.delete(proc);
      resolve({ code: null, signal: null });
    });
  });
  const timeoutMs = opts.timeoutMs ?? 20_000;
  const ready = new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`CLI did not report serving within ${timeoutMs} ms`)), timeoutMs);
    proc.stdout!.on("data", (s: string) => {
      out += s;
      if (/vfio-user-ts: serving /.test(out)) {
        clearTimeout(timer);
        resolve();
      }
    });
    void exited.then((e) => {
      clearTimeout(timer);
      reject(new Error(`CLI exited during startup (code ${e.code}, signal ${e.signal})`));
    });
  });
  let stopping: Promise<{ code: number | null; signal: NodeJS.Signals | null }> | undefined;
  const stop = (killAfterMs = 5000) => {
    stopping ??= (async () => {
      if (proc.exitCode === null && proc.signalCode === null) {
        proc.kill("SIGTERM");
        const t = setTimeout(() => proc.kill("SIGKILL"), killAfterMs);
        try {
          return await exited;
        } finally {
          clearTimeout(t);
        }
      }
      return exited;
    })();
    return stopping;
  };
  try {
    await ready;
  } catch (e) {
    await stop(1000);
    throw new Error(`spawnCliServer: ${(e as Error).message}\nstdout:\n${out}\nstderr:\n${err}`);
  }
  return {
    proc,
    socketPath,
    startMs: performance.now() - t0,
    stdout: () => out,
    stderr: () => err,
    log: capture,
    problems: (mark = 0) => capture.records(mark).filter((r) => r.level >= 40),
    exited,
    stop,
  };
}

/**
 * Two VMs for a QEMU-driven live migration: a source QEMU attached to
 * server A and a destination QEMU (`-incoming defer`) attached to server B,
 * both the migrating QEMU build by default, each server a
 * `vfio-user-ts serve` process of its own (with --trace, so what QEMU sent
 * is in its log). `states(server)` reads the migration state sequence a
 * server went through from that log. No vitest here.
 */
import type { LogCapture, LogRecord, ServerHandle } from "./server.ts";
import { spawnCliServer } from "./server.ts";

/** Either kind of server, as the pair uses it. */
export interface ServerSide {
  readonly socketPath: string;
  readonly log: LogCapture;
  problems(mark?: number): LogRecord[];
  stop(): Promise<unknown>;
  stderr?(): string;
}

/** An in-process server (startServer) as a ServerSide. */
export function inProcess(h: ServerHandle): ServerSide {
  return { socketPath: h.socketPath, log: h.log, problems: (m) => h.problems(m), stop: async () => h.close(), stderr: () => h.log.tail(200) };
}
import { startQemu, type QemuInstance, type StartQemuOptions } from "./qemu.ts";
import { makeSharedDir, type QemuBuild, type SharedDir } from "./shared-dir.ts";

export const MIG_SLOT = 4;

export interface PairOptions {
  qemu?: QemuBuild;
  /** `--device` of each server (default edu on both). */
  device?: string;
  destinationDevice?: string;
  /** More `serve` arguments for both, e.g. `["--opt", "size=64M"]` or `["--p2p"]`. */
  serverArgs?: ServerArgs;
  destinationServerArgs?: ServerArgs;
  /** A destination server of the test's own instead of a `serve` process (e.g. one with a fault). */
  destinationServer?: (dir: SharedDir) => ServerSide;
  /** The same for the source. */
  sourceServer?: (dir: SharedDir) => ServerSide;
  /** The destination's QEMU build, when not the source's (both builds live in the same root). */
  destinationQemu?: QemuBuild;
  /** Guest RAM on a shared memfd (default true); false: anonymous RAM, so DMA goes over the socket. */
  memfd?: boolean;
  memMiB?: number;
  /** Extra vfio-user-pci properties for both QEMUs. */
  deviceProps?: Record<string, unknown>;
  /** Extra QEMU arguments for both. */
  extraArgs?: string[];
}

/** `serve` arguments, or a function of the shared dir (for files in it, e.g. `--client-report`). */
export type ServerArgs = string[] | ((dir: SharedDir, side: "a" | "b") => string[]);

export class MigrationPair {
  src!: QemuInstance;
  dst!: QemuInstance;
  srvA!: ServerSide;
  srvB!: ServerSide;
  readonly dir: SharedDir;
  private readonly opts: PairOptions;

  constructor(prefix: string, opts: PairOptions = {}) {
    this.opts = opts;
    this.dir = makeSharedDir(prefix, opts.qemu ?? "mig");
  }

  /** Both servers, then the source QEMU (the destination comes with startDestination). */
  async startSource(): Promise<void> {
    const base = ["--trace", "--log-level", "debug"];
    this.srvA = this.opts.sourceServer
      ? this.opts.sourceServer(this.dir)
      : await spawnCliServer({ dir: this.dir, name: "a.sock", device: this.opts.device ?? "edu", args: [...base, ...this.args(this.opts.serverArgs, "a")] });
    this.srvB = this.opts.destinationServer
      ? this.opts.destinationServer(this.dir)
      : await spawnCliServer({
          dir: this.dir,
          name: "b.sock",
          device: this.opts.destinationDevice ?? this.opts.device ?? "edu",
          args: [...base, ...this.args(this.opts.destinationServerArgs ?? this.opts.serverArgs, "b")],
        });
    this.src = await startQemu(this.qemuOptions(this.srvA.socketPath));
  }

  private args(a: ServerArgs | undefined, side: "a" | "b"): string[] {
    return typeof a === "function" ? a(this.dir, side) : (a ?? []);
  }

  async startDestination(): Promise<void> {
    const o = this.qemuOptions(this.srvB.socketPath);
    if (this.opts.destinationQemu) o.qemu = this.opts.destinationQemu;
    o.extraArgs = [...(o.extraArgs ?? []), "-incoming", "defer"];
    this.dst = await startQemu(o);
  }

  private qemuOptions(socket: string): StartQemuOptions {
    return {
      dir: this.dir,
      qemu: this.opts.qemu ?? "mig",
      memMiB: this.opts.memMiB ?? 256,
      memfd: this.opts.memfd,
      vfioUserSocket: socket,
      deviceProps: { id: "vfu0", addr: `${MIG_SLOT}.0`, ...this.opts.deviceProps },
      extraArgs: this.opts.extraArgs,
      callTimeoutMs: 30_000,
    };
  }

  async stop(): Promise<void> {
    await Promise.all([this.src?.stop(), this.dst?.stop()]);
    await Promise.all([this.srvA?.stop(), this.srvB?.stop()]);
    this.dir.cleanup();
  }

  /** Tails of all four logs, for a failing assertion's message. */
  context(): string {
    // not the qtest conversation ([R +t] / [S +t] lines) nor the per-message trace
    const tail = (s: string, n = 25) =>
      s
        .split("\n")
        .filter((l) => l.trim() !== "" && !/"msg":"(recv|send)"/.test(l) && !/^\[[RS] \+/.test(l))
        .slice(-n)
        .join("\n");
    return [
      this.src ? `--- source QEMU stderr ---\n${tail(this.src.stderr())}` : "",
      this.dst ? `--- destination QEMU stderr ---\n${tail(this.dst.stderr())}` : "",
      this.srvA ? `--- server A ---\n${tail(this.srvA.stderr?.() ?? this.srvA.log.tail(200))}` : "",
      this.srvB ? `--- server B ---\n${tail(this.srvB.stderr?.() ?? this.srvB.log.tail(200))}` : "",
    ].join("\n");
  }
}

/** Runs `fn`; on failure appends the pair's four logs to the message. */
export async function withContext(p: MigrationPair, fn: () => Promise<void>): Promise<void> {
  try {
    await fn();
  } catch (e) {
    if (e instanceof Error) e.message += `\n${p.context()}`;
    throw e;
  }
}

/** "FROM->NOW" for each MIG_DEVICE_STATE SET the server logged after `mark`. */
export function states(server: { log: LogCapture }, mark = 0): string[] {
  return server.log
    .records(mark)
    .filter((r) => r.msg === "migration state")
    .map((r) => `${String(r.from)}->${String(r.now)}`);
}

/** Records of the server after `mark` whose msg matches. */
export function logged(server: { log: LogCapture }, re: RegExp, mark = 0): LogRecord[] {
  return server.log.records(mark).filter((r) => re.test(r.msg));
}

/** Commands the server received after `mark` (from --trace), by name. */
export function commandCounts(server: { log: LogCapture }, mark = 0): Record<string, number> {
  const out: Record<string, number> = {};
  for (const r of server.log.records(mark)) if (r.msg === "recv") out[String(r.cmd)] = (out[String(r.cmd)] ?? 0) + 1;
  return out;
}

/**
 * Start QEMU 11.1.3 (inside the Debian trixie root, see docker/qemu-root.sh,
 * or natively, see shared-dir.ts) as a q35 machine with accel=qtest, so a
 * test drives it as the guest CPU. No vitest here: docker/demo-qemu.ts uses
 * it too (`describeQemu` lives in describe-qemu.ts).
 *
 * Sockets: both `-qtest unix:P` and `-qmp unix:P` are chardevs in *client*
 * mode, so QEMU connects to sockets the test listens on (as libqtest does);
 * QEMU refuses to start if nobody listens ("Failed to connect to ...").
 * Listening first means no polling for socket files. QEMU connects while it
 * parses its options, before the machine exists; the first qtest reply comes
 * from the main loop, i.e. after every device (vfio-user-pci included) has
 * been realized. That reply is what `realizeMs` times.
 *
 * Process tree: `sh qemu-root.sh exec` execs `unshare -m`, which execs `sh
 * -c 'mount...; exec chroot'`, which execs QEMU: the spawned pid *is* QEMU
 * once it runs, with no intermediate processes left (natively it is QEMU
 * from the start). QEMU also gets
 * `-run-with exit-with-parent=on` so it dies with the test process even if
 * stop() is never reached; a process 'exit' hook SIGKILLs any left running.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { createServer, type Server, type Socket } from "node:net";
import { readdirSync, readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import { Qtest } from "./qtest.ts";
import { Qmp } from "./qmp.ts";
import { qemuLauncher, toGuestPath, type QemuBuild, type SharedDir } from "./shared-dir.ts";

export interface StartQemuOptions {
  dir: SharedDir;
  /** Which QEMU (default Debian's 11.1.3); `dir` must come from makeSharedDir with the same build. */
  qemu?: QemuBuild;
  /** Guest RAM in MiB (default 256). */
  memMiB?: number;
  /**
   * Back guest RAM with a shared memfd (default true), so DMA_MAP carries an
   * fd; with false the RAM is anonymous and a server must use DMA_READ/WRITE.
   */
  memfd?: boolean;
  /** Host path of the vfio-user server socket (where QEMU can reach it, e.g. in `dir`); adds a vfio-user-pci device. */
  vfioUserSocket?: string;
  /** Set `x-no-posted-writes=true` on the device (exact ordering of BAR writes and interrupts). */
  noPostedWrites?: boolean;
  /** Extra vfio-user-pci properties, e.g. `{ id: "vfu0", addr: "4.0", "x-msg-timeout": 1000 }`. */
  deviceProps?: Record<string, unknown>;
  /** Appended to QEMU's command line as is. */
  extraArgs?: string[];
  /** Deadline for QEMU to connect and answer its first qtest command (ms, default 30 000). */
  startTimeoutMs?: number;
  /** Default per-call deadline of the qtest and QMP clients (ms, default 10 000). */
  callTimeoutMs?: number;
}

export interface QemuExit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

export interface QemuInstance {
  readonly qtest: Qtest;
  readonly qmp: Qmp;
  readonly proc: ChildProcess;
  /** QEMU's arguments (after `qemu-system-x86_64`). */
  readonly args: readonly string[];
  /** QEMU's stderr so far (last 256 KiB). */
  stderr(): string;
  /** QEMU's stdout so far (last 256 KiB). */
  stdout(): string;
  /** Spawn to first qtest reply (machine built, devices realized), ms. */
  readonly realizeMs: number;
  /** Spawn to QEMU connecting the qtest socket (option parsing done), ms. */
  readonly connectMs: number;
  /** Resolves when QEMU has exited (for tests that expect it to die). */
  readonly exited: Promise<QemuExit>;
  /** Kill QEMU (SIGTERM, then SIGKILL after `killAfterMs`, default 5000) and close everything. Idempotent. */
  stop(killAfterMs?: number): Promise<QemuExit>;
}

const OUTPUT_CAP = 256 * 1024;
const live = new Set<ChildProcess>();
let exitHookInstalled = false;
let counter = 0;

function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on("exit", () => {
    for (const p of live) {
      try {
        p.kill("SIGKILL");
      } catch {
        // already gone
      }
    }
  });
}

/** Build QEMU's argument list (exported for tests and for logging). */
export function qemuArgs(opts: {
  qtestGuest: string;
  qmpGuest: string;
  memMiB: number;
  memfd: boolean;
  vfioUserGuest?: string;
  noPostedWrites?: boolean;
  deviceProps?: Record<string, unknown>;
  extraArgs?: string[];
}): string[] {
  const m = opts.memMiB;
  const args = [
    "-machine", "q35,accel=qtest",
    "-qtest", `unix:${opts.qtestGuest}`,
    "-qmp", `unix:${opts.qmpGuest}`,
    "-display", "none",
    "-nodefaults",
    "-run-with", "exit-with-parent=on",
    "-m", `${m}M`,
  ];
  if (opts.memfd) {
    args.push("-object", `memory-backend-memfd,id=mem,size=${m}M,share=on`, "-machine", "memory-backend=mem");
  }
  if (opts.vfioUserGuest !== undefined) {
    const dev: Record<string, unknown> = {
      driver: "vfio-user-pci",
      socket: { path: opts.vfioUserGuest, type: "unix" },
    };
    if (opts.noPostedWrites) dev["x-no-posted-writes"] = true;
    Object.assign(dev, opts.deviceProps ?? {});
    args.push("-device", JSON.stringify(dev));
  }
  args.push(...(opts.extraArgs ?? []));
  return args;
}

export async function startQemu(opts: StartQemuOptions): Promise<QemuInstance> {
  const memMiB = opts.memMiB ?? 256;
  if (!Number.isInteger(memMiB) || memMiB < 16) throw new RangeError(`startQemu: memMiB ${memMiB} must be an integer >= 16`);
  const startTimeoutMs = opts.startTimeoutMs ?? 30_000;
  const callTimeoutMs = opts.callTimeoutMs ?? 10_000;
  const n = `${process.pid}-${++counter}`;
  const qtestHost = join(opts.dir.host, `qtest-${n}.sock`);
  const qmpHost = join(opts.dir.host, `qmp-${n}.sock`);
  const args = qemuArgs({
    qtestGuest: toGuestPath(qtestHost),
    qmpGuest: toGuestPath(qmpHost),
    memMiB,
    memfd: opts.memfd ?? true,
    vfioUserGuest: opts.vfioUserSocket === undefined ? undefined : toGuestPath(opts.vfioUserSocket),
    noPostedWrites: opts.noPostedWrites,
    deviceProps: opts.deviceProps,
    extraArgs: opts.extraArgs,
  });

  const servers: Server[] = [];
  const sockets: Socket[] = [];
  const closeAllSockets = () => {
    for (const s of sockets) s.destroy();
    for (const srv of servers) srv.close();
    for (const p of [qtestHost, qmpHost]) rmSync(p, { force: true });
  };

  // Listen before spawning: QEMU connects synchronously during startup.
  const qtestConn = listenOnce(qtestHost, servers, sockets);
  const qmpConn = listenOnce(qmpHost, servers, sockets);
  try {
    await Promise.all([qtestConn.listening, qmpConn.listening]);
  } catch (e) {
    closeAllSockets();
    throw e;
  }

  installExitHook();
  const t0 = performance.now();
  const launcher = qemuLauncher(opts.qemu);
  const proc = spawn(launcher.file, [...launcher.args, ...args], {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, ...launcher.env },
  });
  live.add(proc);
  let err = "";
  let out = "";
  proc.stderr!.setEncoding("utf8");
  proc.stdout!.setEncoding("utf8");
  proc.stderr!.on("data", (s: string) => {
    err = (err + s).slice(-OUTPUT_CAP);
  });
  proc.stdout!.on("data", (s: string) => {
    out = (out + s).slice(-OUTPUT_CAP);
  });
  // 'close' (not 'exit'): stdio is drained, so stderr is complete.
  const exited = new Promise<QemuExit>((resolve) => {
    proc.on("close", (code, signal) => {
      live.delete(proc);
      resolve({ code, signal });
    });
    proc.on("error", (e) => {
      err += `\n[spawn error: ${e.message}]`;
      live.delete(proc);
      resolve({ code: null, signal: null });
    });
  });
  const describeExit = (): string => {
    const status = proc.exitCode !== null ? `QEMU exited with code ${proc.exitCode}` : proc.signalCode !== null ? `QEMU killed by ${proc.signalCode}` : "QEMU still running";
    return `${status}; stderr:\n${err.trim() || "(empty)"}`;
  };

  const kill = async (killAfterMs: number): Promise<QemuExit> => {
    if (proc.exitCode === null && proc.signalCode === null) {
      proc.kill("SIGTERM");
      const timer = setTimeout(() => {
        if (proc.exitCode === null && proc.signalCode === null) proc.kill("SIGKILL");
      }, killAfterMs);
      try {
        return await exited;
      } finally {
        clearTimeout(timer);
      }
    }
    return exited;
  };

  let qtest: Qtest | undefined;
  let qmp: Qmp | undefined;
  let connectMs = 0;
  let realizeMs = 0;
  const startup = (async () => {
    const qs = await qtestConn.connected;
    connectMs = performance.now() - t0;
    qtest = new Qtest(qs, { timeoutMs: callTimeoutMs, describeClose: describeExit });
    const ms = await qmpConn.connected;
    qmp = new Qmp(ms, { timeoutMs: callTimeoutMs, describeClose: describeExit });
    const endian = await qtest.command("endianness", startTimeoutMs);
    realizeMs = performance.now() - t0;
    if (endian !== "little") throw new Error(`qtest: unexpected endianness reply ${JSON.stringify(endian)}`);
    await qmp.handshake(startTimeoutMs);
  })();

  let startTimer: NodeJS.Timeout | undefined;
  const failure = new Promise<never>((_, reject) => {
    startTimer = setTimeout(() => reject(new Error(`QEMU did not become ready within ${startTimeoutMs} ms`)), startTimeoutMs);
    void exited.then(() => reject(new Error("QEMU exited during startup")));
  });
  try {
    await Promise.race([startup, failure]);
  } catch (e) {
    clearTimeout(startTimer);
    startup.catch(() => {});
    await kill(2000);
    closeAllSockets();
    const why = e instanceof Error ? e.message : String(e);
    throw new Error(`startQemu: ${why}\n${describeExit()}\ncommand: qemu-system-x86_64 ${args.map(shellQuote).join(" ")}`);
  }
  clearTimeout(startTimer);

  let stopping: Promise<QemuExit> | undefined;
  return {
    qtest: qtest!,
    qmp: qmp!,
    proc,
    args,
    stderr: () => err,
    stdout: () => out,
    realizeMs,
    connectMs,
    exited,
    stop(killAfterMs = 5000) {
      stopping ??= (async () => {
        try {
          return await kill(killAfterMs);
        } finally {
          qtest?.close();
          qmp?.close();
          closeAllSockets();
        }
      })();
      return stopping;
    },
  };
}

/** Listen on a UNIX socket and resolve with the first connection. */
export function listenOnce(path: string, servers: Server[], sockets: Socket[]): { listening: Promise<void>; connected: Promise<Socket> } {
  let onConn!: (s: Socket) => void;
  const connected = new Promise<Socket>((resolve) => {
    onConn = resolve;
  });
  const srv = createServer((s) => {
    sockets.push(s);
    srv.close(); // one client only; the accepted socket stays open
    onConn(s);
  });
  servers.push(srv);
  const listening = new Promise<void>((resolve, reject) => {
    srv.once("error", reject);
    srv.listen(path, () => {
      srv.off("error", reject);
      resolve();
    });
  });
  return { listening, connected };
}

function shellQuote(s: string): string {
  return /^[\w@%+=:,./-]+$/.test(s) ? s : `'${s.replace(/'/g, `'\\''`)}'`;
}

/**
 * Live processes whose command line contains `needle` (reads /proc; zombies
 * count as gone). Used to check that stop() leaves nothing behind.
 */
export function findProcesses(needle: string): { pid: number; cmdline: string }[] {
  const found: { pid: number; cmdline: string }[] = [];
  let entries: string[];
  try {
    entries = readdirSync("/proc");
  } catch {
    return found;
  }
  for (const e of entries) {
    if (!/^\d+$/.test(e)) continue;
    try {
      const cmdline = readFileSync(`/proc/${e}/cmdline`, "latin1").replace(/\0/g, " ").trim();
      if (!cmdline.includes(needle)) continue;
      const stat = readFileSync(`/proc/${e}/stat`, "latin1");
      const state = stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3);
      if (state === "Z" || state === "X") continue;
      found.push({ pid: Number(e), cmdline });
    } catch {
      // raced with exit
    }
  }
  return found;
}

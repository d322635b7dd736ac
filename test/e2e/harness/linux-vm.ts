/**
 * A Linux guest VM that a test can migrate: bootLinuxGuest's machine
 * (TCG, memfd RAM, the guest kit's kernel and an initramfs with the test's
 * /init, serial on stdio) plus a QMP socket, any number of vfio-user
 * devices, and optionally `-incoming defer` to be a migration destination
 * (same kernel, initramfs and devices: QEMU wants the same machine on both
 * ends). Console lines are collected as they come. No vitest here.
 */
import { spawn, type ChildProcess } from "node:child_process";
import type { Server, Socket } from "node:net";
import { join } from "node:path";
import { linuxGuestArgs, writeInitramfs, type GuestKit } from "./linux-guest.ts";
import { listenOnce, type QemuExit } from "./qemu.ts";
import { Qmp } from "./qmp.ts";
import { qemuLauncher, toGuestPath, type QemuBuild, type SharedDir } from "./shared-dir.ts";

export interface VmDevice {
  /** Host path of the server's socket. */
  socket: string;
  /** vfio-user-pci properties (id, addr, ...). */
  props?: Record<string, unknown>;
}

export interface LinuxVmOptions {
  dir: SharedDir;
  qemu?: QemuBuild;
  kit: GuestKit;
  /** Host path of an initramfs made with writeInitramfs (share one between source and destination). */
  initrd: string;
  devices: VmDevice[];
  memMiB?: number;
  append?: string;
  /** Start as a migration destination (`-incoming defer`). */
  incoming?: boolean;
  /**
   * Keep QEMU's stdin (the serial console's input) open as a pipe, so the
   * test can `type` lines the guest reads on its console (default: no input).
   */
  input?: boolean;
  extraArgs?: string[];
}

export interface LinuxVm {
  readonly qmp: Qmp;
  readonly proc: ChildProcess;
  readonly args: readonly string[];
  /** Complete console lines so far (CRs removed). */
  lines(): string[];
  /** The unfinished last line, if any. */
  partial(): string;
  /** Sends `line` and a newline to the serial console (needs `input: true`). */
  type(line: string): void;
  /** Resolves with the first line (from index `from` on) matching `re`. */
  waitLine(re: RegExp, timeoutMs: number, from?: number): Promise<{ line: string; index: number }>;
  stderr(): string;
  readonly exited: Promise<QemuExit>;
  /** SIGTERM, SIGKILL after 5 s. Idempotent. */
  stop(): Promise<QemuExit>;
}

let vmCounter = 0;

/** Writes the initramfs for `init` into `dir` and returns its host path. */
export function makeInitrd(dir: SharedDir, kit: GuestKit, init: string): string {
  const path = join(dir.host, `initramfs-vm-${process.pid}-${++vmCounter}.gz`);
  writeInitramfs(kit, init, path);
  return path;
}

export async function startLinuxVm(o: LinuxVmOptions): Promise<LinuxVm> {
  const n = `${process.pid}-${++vmCounter}`;
  const qmpHost = join(o.dir.host, `vm-qmp-${n}.sock`);
  const base = linuxGuestArgs({
    vmlinuz: toGuestPath(o.kit.vmlinuz),
    initrd: toGuestPath(o.initrd),
    memMiB: o.memMiB ?? 256,
    append: o.append ?? "console=ttyS0 quiet panic=-1",
  });
  const args = [...base, "-qmp", `unix:${toGuestPath(qmpHost)}`];
  for (const d of o.devices) {
    args.push("-device", JSON.stringify({ driver: "vfio-user-pci", socket: { path: toGuestPath(d.socket), type: "unix" }, ...(d.props ?? {}) }));
  }
  if (o.incoming) args.push("-incoming", "defer");
  args.push(...(o.extraArgs ?? []));

  const servers: Server[] = [];
  const sockets: Socket[] = [];
  const qmpConn = listenOnce(qmpHost, servers, sockets);
  await qmpConn.listening;
  const launcher = qemuLauncher(o.qemu);
  const proc = spawn(launcher.file, [...launcher.args, ...args], { stdio: [o.input ? "pipe" : "ignore", "pipe", "pipe"], env: { ...process.env, ...launcher.env } });
  // a guest that is gone makes writes to its input fail: that shows in the test's waits, not as a crash
  proc.stdin?.on("error", () => {});
  const lines: string[] = [];
  let partial = "";
  let err = "";
  const watchers = new Set<() => void>();
  proc.stdout!.setEncoding("utf8");
  proc.stderr!.setEncoding("utf8");
  proc.stdout!.on("data", (s: string) => {
    partial += s.replace(/\r/g, "");
    let nl: number;
    while ((nl = partial.indexOf("\n")) >= 0) {
      lines.push(partial.slice(0, nl));
      partial = partial.slice(nl + 1);
    }
    for (const w of watchers) w();
  });
  proc.stderr!.on("data", (s: string) => {
    err = (err + s).slice(-64 * 1024);
  });
  const exited = new Promise<QemuExit>((resolve) => {
    proc.on("close", (code, signal) => {
      for (const s of sockets) s.destroy();
      for (const srv of servers) srv.close();
      for (const w of watchers) w();
      resolve({ code, signal });
    });
    proc.on("error", (e) => {
      err += `\n[spawn error: ${e.message}]`;
    });
  });
  const killOnExit = () => proc.kill("SIGKILL");
  process.once("exit", killOnExit);
  void exited.then(() => process.off("exit", killOnExit));

  let qmp: Qmp;
  try {
    const sock = await Promise.race([
      qmpConn.connected,
      exited.then((e) => {
        throw new Error(`QEMU exited before connecting QMP (${JSON.stringify(e)}): ${err.slice(-2000)}`);
      }),
      new Promise<never>((_, reject) => setTimeout(() => reject(new Error("QEMU did not connect QMP within 30 s")), 30_000).unref()),
    ]);
    qmp = new Qmp(sock, { timeoutMs: 30_000, describeClose: () => err.slice(-2000) });
    await qmp.handshake();
  } catch (e) {
    proc.kill("SIGKILL");
    await exited;
    throw e;
  }

  let stopping: Promise<QemuExit> | undefined;
  return {
    qmp,
    proc,
    args,
    lines: () => lines,
    partial: () => partial,
    stderr: () => err,
    exited,
    type(line) {
      if (!proc.stdin) throw new Error("startLinuxVm: type() needs input: true");
      proc.stdin.write(`${line}\n`);
    },
    waitLine(re, timeoutMs, from = 0) {
      return new Promise((resolve, reject) => {
        let done = false;
        const check = () => {
          if (done) return;
          for (let i = from; i < lines.length; i++) {
            if (re.test(lines[i]!)) {
              done = true;
              cleanup();
              resolve({ line: lines[i]!, index: i });
              return;
            }
          }
          if (proc.exitCode !== null || proc.signalCode !== null) {
            done = true;
            cleanup();
            reject(new Error(`QEMU exited before a console line matched ${re}; last lines:\n${lines.slice(-15).join("\n")}\n${err.slice(-1500)}`));
          }
        };
        const timer = setTimeout(() => {
          if (done) return;
          done = true;
          cleanup();
          reject(new Error(`no console line matched ${re} within ${timeoutMs} ms; last lines:\n${lines.slice(-15).join("\n")}`));
        }, timeoutMs);
        const cleanup = () => {
          clearTimeout(timer);
          watchers.delete(check);
        };
        watchers.add(check);
        check();
      });
    },
    stop() {
      stopping ??= (async () => {
        if (proc.exitCode === null && proc.signalCode === null) {
          proc.kill("SIGTERM");
          const t = setTimeout(() => proc.kill("SIGKILL"), 5000);
          try {
            await exited;
          } finally {
            clearTimeout(t);
          }
        }
        qmp.close();
        return exited;
      })();
      return stopping;
    },
  };
}

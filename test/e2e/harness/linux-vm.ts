/**
 * A Linux guest VM that keeps running while a test talks to it: QEMU under
 * TCG with the guest kit, its serial console collected line by line (with
 * the host time each line arrived), and a QMP connection, so a test can
 * migrate it (migrate.ts) while the guest works. The destination of a
 * migration is the same command line with `-incoming defer`. No vitest here.
 *
 * bootLinuxGuest (linux-guest.ts) is the simpler tool for a guest that
 * only has to run to its end.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { createServer, type Socket } from "node:net";
import { join } from "node:path";
import { rmSync } from "node:fs";
import { linuxGuestArgs, parseResults, writeInitramfs, type GuestKit, type GuestResult } from "./linux-guest.ts";
import { Qmp } from "./qmp.ts";
import type { QemuExit } from "./qemu.ts";
import { qemuLauncher, toGuestPath, type QemuBuild, type SharedDir } from "./shared-dir.ts";

export interface LinuxVmOptions {
  dir: SharedDir;
  qemu?: QemuBuild;
  kit: GuestKit;
  /** Host path of an initramfs made with `makeInitramfs` (a migration's two ends use the same one). */
  initrd: string;
  vfioUserSocket?: string;
  /** vfio-user-pci properties (an `id` lets migration match the device on both ends). */
  deviceProps?: Record<string, unknown>;
  memMiB?: number;
  append?: string;
  /** Start as a migration destination (`-incoming defer`). */
  incoming?: boolean;
  /** A name for logs and socket files. */
  name: string;
}

export interface ConsoleLine {
  text: string;
  /** performance.now() when it arrived. */
  at: number;
}

export interface LinuxVm {
  readonly qmp: Qmp;
  readonly proc: ChildProcess;
  readonly args: readonly string[];
  /** Console lines so far (CRs removed). */
  lines(): readonly ConsoleLine[];
  results(): GuestResult[];
  stderr(): string;
  /** Resolves with the first console line (from `since`) matching `re`; rejects after `timeoutMs` or at exit. */
  waitLine(re: RegExp, timeoutMs: number, since?: number): Promise<ConsoleLine>;
  readonly exited: Promise<QemuExit>;
  /** SIGTERM, then SIGKILL; idempotent. */
  stop(): Promise<QemuExit>;
}

/** The test's /init on top of the kit's base, written once into `dir` (both ends of a migration boot the same). */
export function makeInitramfs(dir: SharedDir, kit: GuestKit, init: string, name = "initramfs.gz"): string {
  const path = join(dir.host, name);
  writeInitramfs(kit, init, path);
  return path;
}

export async function startLinuxVm(o: LinuxVmOptions): Promise<LinuxVm> {
  const qmpHost = join(o.dir.host, `qmp-${o.name}-${process.pid}.sock`);
  rmSync(qmpHost, { force: true });
  const server = createServer();
  const connected = new Promise<Socket>((resolve) => server.once("connection", resolve));
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(qmpHost, () => resolve());
  });
  const args = linuxGuestArgs({
    vmlinuz: toGuestPath(o.kit.vmlinuz),
    initrd: toGuestPath(o.initrd),
    memMiB: o.memMiB ?? 256,
    append: o.append ?? "console=ttyS0 quiet panic=-1",
    vfioUserGuest: o.vfioUserSocket === undefined ? undefined : toGuestPath(o.vfioUserSocket),
    deviceProps: o.deviceProps,
    extraArgs: ["-qmp", `unix:${toGuestPath(qmpHost)}`, ...(o.incoming ? ["-incoming", "defer"] : [])],
  });
  const launcher = qemuLauncher(o.qemu);
  const proc = spawn(launcher.file, [...launcher.args, ...args], { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, ...launcher.env } });
  const lines: ConsoleLine[] = [];
  const waiters: { re: RegExp; since: number; resolve(l: ConsoleLine): void }[] = [];
  let partial = "";
  let err = "";
  proc.stdout!.setEncoding("utf8");
  proc.stderr!.setEncoding("utf8");
  proc.stdout!.on("data", (s: string) => {
    partial += s.replace(/\r/g, "");
    let nl: number;
    while ((nl = partial.indexOf("\n")) >= 0) {
      const line = { text: partial.slice(0, nl), at: performance.now() };
      partial = partial.slice(nl + 1);
      lines.push(line);
      for (let i = waiters.length - 1; i >= 0; i--) {
        const w = waiters[i]!;
        if (lines.length - 1 >= w.since && w.re.test(line.text)) {
          waiters.splice(i, 1);
          w.resolve(line);
        }
      }
    }
  });
  proc.stderr!.on("data", (s: string) => {
    err = (err + s).slice(-64 * 1024);
  });
  const exited = new Promise<QemuExit>((resolve) => proc.on("close", (code, signal) => resolve({ code, signal })));
  const killOnExit = () => proc.kill("SIGKILL");
  process.once("exit", killOnExit);
  void exited.then(() => {
    process.off("exit", killOnExit);
    server.close();
    rmSync(qmpHost, { force: true });
  });
  const socket = await Promise.race([
    connected,
    exited.then((e) => {
      throw new Error(`QEMU (${o.name}) exited before connecting QMP (${JSON.stringify(e)}): ${err.slice(-2000)}`);
    }),
  ]);
  const qmp = new Qmp(socket, { timeoutMs: 20_000, describeClose: () => err.slice(-2000) });
  await qmp.handshake();
  let stopping: Promise<QemuExit> | undefined;
  return {
    qmp,
    proc,
    args,
    lines: () => lines,
    results: () => parseResults(lines.map((l) => l.text).join("\n")),
    stderr: () => err,
    waitLine(re, timeoutMs, since = 0) {
      const hit = lines.slice(since).find((l) => re.test(l.text));
      if (hit) return Promise.resolve(hit);
      return new Promise<ConsoleLine>((resolve, reject) => {
        const w = { re, since, resolve: (l: ConsoleLine) => (clearTimeout(timer), resolve(l)) };
        const timer = setTimeout(() => {
          waiters.splice(waiters.indexOf(w), 1);
          reject(new Error(`${o.name}: no console line ${re} within ${timeoutMs} ms; last lines:\n${lines.slice(-20).map((l) => l.text).join("\n")}`));
        }, timeoutMs);
        waiters.push(w);
        void exited.then(() => {
          if (!waiters.includes(w)) return;
          waiters.splice(waiters.indexOf(w), 1);
          clearTimeout(timer);
          reject(new Error(`${o.name}: QEMU exited before a console line ${re}; last lines:\n${lines.slice(-20).map((l) => l.text).join("\n")}\n${err.slice(-2000)}`));
        });
      });
    },
    exited,
    stop() {
      stopping ??= (async () => {
        if (proc.exitCode === null && proc.signalCode === null) {
          proc.kill("SIGTERM");
          const t = setTimeout(() => proc.kill("SIGKILL"), 3000);
          try {
            return await exited;
          } finally {
            clearTimeout(t);
          }
        }
        return exited;
      })();
      return stopping;
    },
  };
}

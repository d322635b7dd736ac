/**
 * Boot a real Linux guest (Debian trixie's cloud kernel, busybox) under
 * QEMU/TCG with our vfio-user device attached, and collect what its /init
 * prints on the serial console. No vitest here.
 *
 * The guest kit (docker/guest-kit.sh) supplies `vmlinuz` and
 * `initramfs-base.cpio.gz` (busybox and the uio modules). Each boot appends a
 * second, gzipped cpio written here with the test's `/init`, `/dev/console`
 * and the mount points: the kernel unpacks concatenated archives in order,
 * so nothing is repacked.
 *
 * Conventions for /init scripts (see GUEST_PRELUDE): print `RESULT name
 * value` lines, end with `RESULT done <uptime>` and `poweroff -f`. QEMU runs
 * with -no-reboot and the kernel with panic=-1, so a failing /init (which
 * panics the kernel) ends QEMU too; a hung guest is killed at `timeoutMs`.
 */
import { execFile, spawn } from "node:child_process";
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { gzipSync } from "node:zlib";
import type { QemuExit } from "./qemu.ts";
import { REPO_ROOT, qemuLauncher, qemuMigRootPath, qemuMode, qemuRootPath, toGuestPath, type QemuBuild, type SharedDir } from "./shared-dir.ts";

export const GUEST_KIT_SCRIPT = join(REPO_ROOT, "docker/guest-kit.sh");
const KIT_STAMP = ".ready";
const NATIVE_KIT = "/var/cache/vfio-user-ts/guest-kit";

export interface GuestKit {
  readonly dir: string;
  /** Host paths of the kernel and of the initramfs base. */
  readonly vmlinuz: string;
  readonly initramfsBase: string;
  /** The stamp: kernel and busybox versions. */
  readonly version: string;
}

export type GuestKitStatus = { ok: true; kit: GuestKit; builtMs?: number } | { ok: false; why: string };

/**
 * Where the kit is, as guest-kit.sh computes it: `$VFIO_USER_GUEST_KIT`,
 * else `<root>/opt/guest-kit` (chroot mode) or /var/cache/vfio-user-ts/guest-kit (native).
 */
export function guestKitDir(build: QemuBuild = "debian"): string {
  // the migrating QEMU's root has its own kit (docker/qemu-mig.sh builds it)
  if (build !== "debian") return join(qemuMigRootPath(), "opt/guest-kit");
  const env = process.env.VFIO_USER_GUEST_KIT;
  if (env !== undefined && env !== "") return env;
  return qemuMode() === "chroot" ? join(qemuRootPath(), "opt/guest-kit") : NATIVE_KIT;
}

/**
 * The stamp line of the kit's current contents, as guest-kit.sh writes it
 * (its KIT_FORMAT): a kit built before the contents changed (e.g. without
 * virtio_blk.ko) lacks it and counts as not built.
 */
export function guestKitFormat(): string {
  const m = /^KIT_FORMAT="([^"]*)"$/m.exec(readFileSync(GUEST_KIT_SCRIPT, "utf8"));
  if (!m) throw new Error(`${GUEST_KIT_SCRIPT} has no KIT_FORMAT line`);
  return m[1]!;
}

/** The kit if guest-kit.sh has completed it in the current format (in the root of the given QEMU build). */
export function guestKit(build: QemuBuild = "debian"): GuestKitStatus {
  const dir = guestKitDir(build);
  const stamp = join(dir, KIT_STAMP);
  if (!existsSync(stamp)) return { ok: false, why: `guest kit ${dir} is not built (no ${KIT_STAMP}); run as root: docker/guest-kit.sh setup` };
  const format = guestKitFormat();
  if (!readFileSync(stamp, "utf8").split("\n").includes(format)) {
    return { ok: false, why: `guest kit ${dir} was built before "${format}"; run as root: docker/guest-kit.sh setup (it rebuilds the kit)` };
  }
  const kit: GuestKit = {
    dir,
    vmlinuz: join(dir, "vmlinuz"),
    initramfsBase: join(dir, "initramfs-base.cpio.gz"),
    version: readFileSync(stamp, "utf8").split("\n").filter((l) => l !== "" && l !== format).join("; "),
  };
  for (const f of [kit.vmlinuz, kit.initramfsBase]) if (!existsSync(f)) return { ok: false, why: `guest kit ${dir} has a stamp but no ${f}` };
  return { ok: true, kit };
}

/**
 * The kit, building it first if it is missing and we are root (network to
 * deb.debian.org needed). The script gets the harness's mode and root so
 * both agree on where the kit goes.
 */
export async function ensureGuestKit(timeoutMs = 300_000, build: QemuBuild = "debian"): Promise<GuestKitStatus> {
  const have = guestKit(build);
  if (have.ok) return have;
  const uid = typeof process.getuid === "function" ? process.getuid() : -1;
  if (uid !== 0) return { ok: false, why: `${have.why} (building it needs root; uid is ${uid})` };
  let env: NodeJS.ProcessEnv;
  if (build !== "debian") {
    // the migrating QEMU's root: the kit goes where docker/qemu-mig.sh puts it
    if (!existsSync(qemuMigRootPath())) return { ok: false, why: `${have.why} (and the migrating QEMU's root ${qemuMigRootPath()} is missing)` };
    env = { ...process.env, VFIO_USER_QEMU: "chroot", VFIO_USER_QEMU_ROOT: qemuMigRootPath(), VFIO_USER_GUEST_KIT: "" };
  } else {
    env = { ...process.env, VFIO_USER_QEMU: qemuMode(), VFIO_USER_GUEST_KIT: guestKitDir() };
    if (qemuMode() === "chroot") env.VFIO_USER_QEMU_ROOT = qemuRootPath();
  }
  const t0 = performance.now();
  const built = await new Promise<{ ok: boolean; out: string }>((resolve) => {
    execFile("sh", [GUEST_KIT_SCRIPT, "setup"], { env, timeout: timeoutMs, maxBuffer: 4 << 20 }, (err, stdout, stderr) => {
      resolve({ ok: err === null, out: `${stdout}${stderr}`.trim() || (err?.message ?? "") });
    });
  });
  const builtMs = performance.now() - t0;
  if (!built.ok) return { ok: false, why: `docker/guest-kit.sh setup failed after ${Math.round(builtMs)} ms: ${built.out.slice(-2000)}` };
  const now = guestKit(build);
  return now.ok ? { ...now, builtMs } : now;
}

// ---------------------------------------------------------------- cpio

export interface CpioEntry {
  /** Path inside the archive, without a leading slash (e.g. `init`, `dev/console`). */
  name: string;
  /** Full st_mode: type and permissions (e.g. 0o100755, 0o040755, 0o020600). */
  mode: number;
  data?: Buffer | string;
  /** Device number for character and block devices. */
  rdev?: { major: number; minor: number };
}

export const S_IFREG = 0o100000;
export const S_IFDIR = 0o040000;
export const S_IFCHR = 0o020000;

/**
 * A cpio archive in the "newc" format (the one the kernel unpacks):
 * 110-byte ASCII headers, names and data padded to 4 bytes, then TRAILER!!!.
 * Owner root, mtime 0, inode numbers from 1.
 */
export function cpioNewc(entries: readonly CpioEntry[]): Buffer {
  const parts: Buffer[] = [];
  const pad4 = (n: number) => Buffer.alloc((4 - (n % 4)) % 4);
  const add = (name: string, mode: number, data: Buffer, ino: number, rdev = { major: 0, minor: 0 }) => {
    const nameBytes = Buffer.from(`${name}\0`, "utf8");
    const isDir = (mode & 0o170000) === S_IFDIR;
    const fields = [ino, mode, 0, 0, isDir ? 2 : 1, 0, data.length, 0, 0, rdev.major, rdev.minor, nameBytes.length, 0];
    const header = Buffer.from(`070701${fields.map((f) => (f >>> 0).toString(16).padStart(8, "0")).join("")}`, "ascii");
    parts.push(header, nameBytes, pad4(header.length + nameBytes.length), data, pad4(data.length));
  };
  entries.forEach((e, i) => {
    const data = e.data === undefined ? Buffer.alloc(0) : Buffer.isBuffer(e.data) ? e.data : Buffer.from(e.data, "utf8");
    add(e.name.replace(/^\/+/, ""), e.mode, data, i + 1, e.rdev);
  });
  add("TRAILER!!!", 0, Buffer.alloc(0), 0);
  return Buffer.concat(parts);
}

/**
 * Write `<kit base> + gzip(cpio of /init and friends)` to `outPath` and
 * return its size. `files` adds more regular files (path -> contents, mode 0644).
 */
export function writeInitramfs(kit: GuestKit, init: string, outPath: string, files: Record<string, string | Buffer> = {}): number {
  const overlay = cpioNewc([
    { name: "dev", mode: S_IFDIR | 0o755 },
    { name: "dev/console", mode: S_IFCHR | 0o600, rdev: { major: 5, minor: 1 } },
    { name: "proc", mode: S_IFDIR | 0o755 },
    { name: "sys", mode: S_IFDIR | 0o755 },
    { name: "tmp", mode: S_IFDIR | 0o1777 },
    { name: "init", mode: S_IFREG | 0o755, data: init },
    ...Object.entries(files).map(([name, data]) => ({ name, mode: S_IFREG | 0o644, data })),
  ]);
  const image = Buffer.concat([readFileSync(kit.initramfsBase), gzipSync(overlay, { level: 6 })]);
  writeFileSync(outPath, image);
  return image.length;
}

// ---------------------------------------------------------------- guest scripts

/**
 * The start of every /init: busybox applets, proc/sys/devtmpfs, and shell
 * helpers. `result NAME VALUE...` prints a RESULT line; `finish` prints
 * `RESULT done <uptime>` and powers off; `fail MSG` reports an error and
 * finishes; `pci_find VENDOR DEVICE` sets DEV (sysfs dir) and prints the
 * number of matches as RESULT matches; `bar_base` prints BAR0's physical
 * address from sysfs `resource`; `rd OFF` / `wr OFF VAL` are 32-bit BAR0
 * accesses with devmem at $BAR + OFF; `cfg16 OFF` reads config space;
 * `uio_irqs` sums the uio_pci_generic row of /proc/interrupts;
 * `intx_enable` clears the command register's INTx disable bit (what
 * uio_pci_generic expects user space to do after each interrupt).
 */
export const GUEST_PRELUDE = String.raw`#!/bin/sh
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
export PATH=/bin
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
result() { echo "RESULT $*"; }
finish() { result done "$(cut -d' ' -f1 /proc/uptime)"; poweroff -f; sleep 10; }
fail() { result error "$*"; finish; }
result start "$(cut -d' ' -f1 /proc/uptime)"
pci_find() {
  DEV=""; n=0
  for d in /sys/bus/pci/devices/*; do
    if [ "$(cat "$d/vendor")" = "$1" ] && [ "$(cat "$d/device")" = "$2" ]; then DEV=$d; n=$((n + 1)); fi
  done
  result matches "$n"
  [ -n "$DEV" ] || fail "no PCI device $1:$2"
}
bar_base() { head -n 1 "$DEV/resource" | cut -d' ' -f1; }
bar_end() { head -n 1 "$DEV/resource" | cut -d' ' -f2; }
rd() { devmem "$(printf 0x%x $((BAR + $1)))" 32; }
wr() { devmem "$(printf 0x%x $((BAR + $1)))" 32 "$2"; }
cfg16() { hexdump -s "$1" -n 2 -e '1/2 "0x%04x"' "$DEV/config"; }
cfg8_write() { printf "\\$(printf %03o "$2")" | dd of="$DEV/config" bs=1 seek="$1" count=1 conv=notrunc 2>/dev/null; }
uio_irqs() { awk '/uio_pci_generic/ { s = 0; for (i = 2; i <= NF; i++) { if ($i ~ /^[0-9]+$/) s += $i; else break }; print s; exit }' /proc/interrupts; }
intx_enable() { hi=$(( $(cfg16 4) >> 8 )); cfg8_write 5 $((hi & ~4)); }
# wait_uio FD SECONDS: read the 4-byte event count from an open /dev/uioN (blocks until an interrupt)
wait_uio() { timeout "$2" dd bs=4 count=1 2>/dev/null <&"$1" | hexdump -e '1/4 "%u"'; }
`;

// ---------------------------------------------------------------- boot

export interface LinuxGuestOptions {
  dir: SharedDir;
  /** Which QEMU (default Debian's); `dir` and `kit` must belong to the same build. */
  qemu?: QemuBuild;
  kit: GuestKit;
  /** The whole /init script (start it with GUEST_PRELUDE). */
  init: string;
  /** Host path of our server's socket; adds a vfio-user-pci device. */
  vfioUserSocket?: string;
  /** Extra vfio-user-pci properties (e.g. `{ addr: "4.0" }`). */
  deviceProps?: Record<string, unknown>;
  /** Guest RAM, MiB (default 256), backed by a shared memfd. */
  memMiB?: number;
  /** Kill QEMU after this long (ms, default 45 000). */
  timeoutMs?: number;
  /** Kernel command line (default `console=ttyS0 quiet panic=-1`). */
  append?: string;
  extraArgs?: string[];
  /** Called with each console line as it arrives. */
  onLine?: (line: string) => void;
}

export interface GuestResult {
  name: string;
  value: string;
}

export interface LinuxGuestRun {
  /** Everything the guest printed on ttyS0 (CRs removed). */
  console: string;
  /** The RESULT lines, in order. */
  results: GuestResult[];
  exit: QemuExit;
  timedOut: boolean;
  stderr: string;
  args: string[];
  initramfsBytes: number;
  /** Spawn to the first RESULT line, to `RESULT done`, and to QEMU's exit (ms). */
  firstResultMs?: number;
  doneMs?: number;
  totalMs: number;
}

let bootCounter = 0;

/** QEMU's arguments for a guest boot (paths already as QEMU sees them). */
export function linuxGuestArgs(o: { vmlinuz: string; initrd: string; memMiB: number; append: string; vfioUserGuest?: string; deviceProps?: Record<string, unknown>; extraArgs?: string[] }): string[] {
  const m = o.memMiB;
  const args = [
    "-machine", "q35,accel=tcg",
    "-m", `${m}M`,
    "-object", `memory-backend-memfd,id=mem,size=${m}M,share=on`,
    "-machine", "memory-backend=mem",
    "-nodefaults",
    "-display", "none",
    "-monitor", "none",
    "-serial", "stdio",
    "-no-reboot",
    "-run-with", "exit-with-parent=on",
    "-kernel", o.vmlinuz,
    "-initrd", o.initrd,
    "-append", o.append,
  ];
  if (o.vfioUserGuest !== undefined) {
    args.push("-device", JSON.stringify({ driver: "vfio-user-pci", socket: { path: o.vfioUserGuest, type: "unix" }, ...(o.deviceProps ?? {}) }));
  }
  args.push(...(o.extraArgs ?? []));
  return args;
}

/** Parse `RESULT name value...` lines (value: the rest of the line, trimmed). */
export function parseResults(consoleText: string): GuestResult[] {
  const out: GuestResult[] = [];
  for (const line of consoleText.split("\n")) {
    const m = /^RESULT (\S+)(?: (.*))?$/.exec(line.trim());
    if (m) out.push({ name: m[1]!, value: (m[2] ?? "").trim() });
  }
  return out;
}

/** Boot the guest and wait until QEMU exits (poweroff, panic) or `timeoutMs` passes. */
export async function bootLinuxGuest(o: LinuxGuestOptions): Promise<LinuxGuestRun> {
  const memMiB = o.memMiB ?? 256;
  const timeoutMs = o.timeoutMs ?? 45_000;
  const initrdHost = join(o.dir.host, `initramfs-${process.pid}-${++bootCounter}.gz`);
  const initramfsBytes = writeInitramfs(o.kit, o.init, initrdHost);
  const args = linuxGuestArgs({
    vmlinuz: toGuestPath(o.kit.vmlinuz),
    initrd: toGuestPath(initrdHost),
    memMiB,
    append: o.append ?? "console=ttyS0 quiet panic=-1",
    vfioUserGuest: o.vfioUserSocket === undefined ? undefined : toGuestPath(o.vfioUserSocket),
    deviceProps: o.deviceProps,
    extraArgs: o.extraArgs,
  });
  const launcher = qemuLauncher(o.qemu);
  const t0 = performance.now();
  const proc = spawn(launcher.file, [...launcher.args, ...args], { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, ...launcher.env } });
  let out = "";
  let err = "";
  let partial = "";
  let firstResultMs: number | undefined;
  let doneMs: number | undefined;
  proc.stdout.setEncoding("utf8");
  proc.stderr.setEncoding("utf8");
  proc.stdout.on("data", (s: string) => {
    s = s.replace(/\r/g, "");
    out += s;
    partial += s;
    let nl: number;
    while ((nl = partial.indexOf("\n")) >= 0) {
      const line = partial.slice(0, nl);
      partial = partial.slice(nl + 1);
      if (line.startsWith("RESULT ")) {
        firstResultMs ??= performance.now() - t0;
        if (line.startsWith("RESULT done")) doneMs ??= performance.now() - t0;
      }
      o.onLine?.(line);
    }
  });
  proc.stderr.on("data", (s: string) => {
    err = (err + s).slice(-64 * 1024);
  });
  let timedOut = false;
  const exit = await new Promise<QemuExit>((resolve) => {
    const timer = setTimeout(() => {
      timedOut = true;
      proc.kill("SIGTERM");
      setTimeout(() => proc.kill("SIGKILL"), 3000).unref();
    }, timeoutMs);
    const onExit = () => {
      try {
        proc.kill("SIGKILL");
      } catch {
        // already gone
      }
    };
    process.once("exit", onExit);
    proc.on("error", (e) => {
      err += `\n[spawn error: ${e.message}]`;
    });
    proc.on("close", (code, signal) => {
      clearTimeout(timer);
      process.off("exit", onExit);
      resolve({ code, signal });
    });
  });
  if (partial !== "") o.onLine?.(partial);
  return {
    console: out,
    results: parseResults(out),
    exit,
    timedOut,
    stderr: err,
    args,
    initramfsBytes,
    firstResultMs,
    doneMs,
    totalMs: performance.now() - t0,
  };
}

/** The RESULT values by name (the last one wins), for assertions. */
export function resultMap(results: readonly GuestResult[]): Record<string, string> {
  const m: Record<string, string> = {};
  for (const r of results) m[r.name] = r.value;
  return m;
}

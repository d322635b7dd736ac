/**
 * QEMU made easy: which QEMU runs here, how it reaches a server's socket,
 * and `vfio-user-ts qemu --socket PATH`, which starts it attached.
 *
 * Two ways QEMU 11.1 (the first with vfio-user-pci) runs:
 *
 *   native   `qemu-system-x86_64` on PATH is 11.1 or newer (Debian trixie
 *            with trixie-backports, the Docker image): paths are paths.
 *   root     Debian 12 and older: QEMU 11.1.3 lives in a Debian trixie root
 *            (docker/qemu-root.sh setup) and runs chrooted there, in a
 *            private mount namespace. A socket under the root's tmp/ is
 *            seen inside without the root prefix; for a socket elsewhere
 *            its directory is bind-mounted inside that namespace
 *            (`qemu-root.sh exec --bind HOST[:INNER]`): the host's /tmp
 *            over the root's /tmp, so /tmp/x.sock keeps its spelling, or
 *            any other directory onto a fresh mount point under the root's
 *            tmp/. Nothing in the root changes.
 *
 * VFIO_USER_QEMU=native|chroot picks one (as the e2e harness does); unset
 * or `auto`: native when it is new enough, else the root when it is set up.
 */
import { spawn, spawnSync } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import path from "node:path";
import { gzipSync } from "node:zlib";
import { formatSize, parseSize } from "../device/options.ts";
import { onInterrupt } from "./io.ts";
import { GUEST_KIT_SCRIPT, QEMU_ROOT_SCRIPT } from "./self.ts";
import { parseCommandArgs, UsageError } from "./usage.ts";

const QEMU = "qemu-system-x86_64";
const MIN_VERSION: readonly [number, number] = [11, 1];
const DEFAULT_ROOT = "/var/cache/vfio-user-ts/qemu-root";
const ROOT_STAMP = ".vfio-user-ts-ready";
const NATIVE_KIT = "/var/cache/vfio-user-ts/guest-kit";

export type QemuEnv =
  | { mode: "native"; version: string }
  | { mode: "root"; root: string; version: string }
  | { mode: "none"; why: string };

/** The QEMU root's host path ($VFIO_USER_QEMU_ROOT or the scripts' default). */
export function qemuRoot(): string {
  return path.resolve(process.env.VFIO_USER_QEMU_ROOT || DEFAULT_ROOT);
}

function nativeVersion(): string | null {
  const r = spawnSync(QEMU, ["--version"], { encoding: "utf8", timeout: 20_000, stdio: ["ignore", "pipe", "ignore"] });
  if (r.status !== 0) return null;
  return r.stdout.split("\n")[0]!.trim();
}

function newEnough(line: string): boolean {
  const m = /version (\d+)\.(\d+)/.exec(line);
  return m !== null && (Number(m[1]) > MIN_VERSION[0] || (Number(m[1]) === MIN_VERSION[0] && Number(m[2]) >= MIN_VERSION[1]));
}

let cached: QemuEnv | undefined;

/** Which QEMU runs here (cached). */
export function qemuEnv(): QemuEnv {
  if (cached) return cached;
  const want = (process.env.VFIO_USER_QEMU ?? "auto").trim() || "auto";
  const root = qemuRoot();
  const rootReady = existsSync(path.join(root, ROOT_STAMP));
  const rootEnv = (): QemuEnv =>
    rootReady
      ? { mode: "root", root, version: readFileSync(path.join(root, ROOT_STAMP), "utf8").trim().split("\n")[0] ?? "QEMU (trixie root)" }
      : { mode: "none", why: `the QEMU root ${root} is not set up; as root: sh ${QEMU_ROOT_SCRIPT} setup (about 80 s, needs deb.debian.org)` };
  if (want === "chroot") return (cached = rootEnv());
  const native = want === "native" || !rootReady ? nativeVersion() : null;
  if (want === "native") {
    if (native === null) return (cached = { mode: "none", why: `VFIO_USER_QEMU=native but ${QEMU} does not run` });
    return (cached = newEnough(native) ? { mode: "native", version: native } : { mode: "none", why: `${native} is too old for vfio-user-pci (11.1 or newer)` });
  }
  if (native !== null && newEnough(native)) return (cached = { mode: "native", version: native });
  if (rootReady) return (cached = rootEnv());
  const why = native !== null ? `${native} on PATH is too old for vfio-user-pci (11.1 or newer), and ` : `no ${QEMU} on PATH, and `;
  return (cached = { mode: "none", why: why + (rootEnv() as { why: string }).why });
}

/** For tests: forget the cached environment. */
export function resetQemuEnv(): void {
  cached = undefined;
}

/** Quotes a word for sh when it needs it. */
export function shellQuote(word: string): string {
  return /^[\w@%+=:,./-]+$/.test(word) ? word : `'${word.replaceAll("'", "'\\''")}'`;
}

/** The vfio-user-pci device for QEMU's -device, with the socket as QEMU spells it. */
export function vfioUserDevice(socketAsSeen: string): string {
  return JSON.stringify({ driver: "vfio-user-pci", socket: { path: socketAsSeen, type: "unix" } });
}

/** QEMU's arguments for a machine with `mem` of memfd RAM and the device on `socketAsSeen`. */
export function qemuArgs(socketAsSeen: string, mem = "512M"): string[] {
  return [
    "-machine", "q35", "-m", mem, "-nodefaults", "-display", "none",
    "-object", `memory-backend-memfd,id=mem,size=${mem},share=on`, "-machine", "memory-backend=mem",
    "-device", vfioUserDevice(socketAsSeen),
  ];
}

/**
 * The QEMU command line that attaches to a server on `socket`, as it reads
 * with QEMU installed (the tutorial shows this one). `prefix` is what runs
 * QEMU (e.g. the root's launcher).
 */
export function qemuCommandLine(socket: string, prefix = QEMU, socketAsSeen = path.resolve(socket)): string {
  const dev = vfioUserDevice(socketAsSeen);
  return [
    `${prefix} -machine q35 -m 512M -nodefaults -display none`,
    "  -object memory-backend-memfd,id=mem,size=512M,share=on -machine memory-backend=mem",
    `  -device ${shellQuote(dev)}`,
  ].join(" \\\n");
}

/** How QEMU sees a host path inside the root, or null when it cannot without a bind mount. */
function insideRoot(root: string, hostPath: string): string | null {
  const abs = path.resolve(hostPath);
  return abs.startsWith(`${root}/`) ? abs.slice(root.length) : null;
}

function underTmp(abs: string): boolean {
  return abs === "/tmp" || abs.startsWith("/tmp/");
}

/**
 * The command line `serve` prints for this machine: works as printed, or
 * null (with the reason) when QEMU here cannot reach the socket without
 * `vfio-user-ts qemu`, which can.
 */
export function attachLine(socket: string): { line: string } | { line: null; why: string } {
  const env = qemuEnv();
  const abs = path.resolve(socket);
  if (env.mode === "native") return { line: qemuCommandLine(abs) };
  if (env.mode === "none") return { line: null, why: env.why };
  const seen = insideRoot(env.root, abs);
  const launcher = `sh ${shellQuote(QEMU_ROOT_SCRIPT)} exec`;
  if (seen !== null) return { line: qemuCommandLine(abs, `${launcher} ${QEMU}`, seen) };
  if (underTmp(abs)) return { line: qemuCommandLine(abs, `${launcher} --bind /tmp ${QEMU}`, abs) };
  return { line: null, why: `QEMU runs chrooted in ${env.root} here and reaches only sockets under /tmp or ${env.root}/tmp by hand` };
}

// ---------------------------------------------------------------------------
// The guest kit
// ---------------------------------------------------------------------------

/** The kit's directory as the host sees it. */
function guestKitDir(env: QemuEnv): string {
  if (process.env.VFIO_USER_GUEST_KIT) return path.resolve(process.env.VFIO_USER_GUEST_KIT);
  return env.mode === "root" ? path.join(env.root, "opt/guest-kit") : NATIVE_KIT;
}

const S_IFREG = 0o100000;
const S_IFDIR = 0o040000;
const S_IFCHR = 0o020000;

/** A "newc" cpio archive (what the kernel unpacks as an initramfs). */
function cpio(entries: readonly { name: string; mode: number; data?: string; rdev?: [number, number] }[]): Buffer {
  const parts: Buffer[] = [];
  const pad = (n: number) => Buffer.alloc((4 - (n % 4)) % 4);
  [...entries, { name: "TRAILER!!!", mode: 0 }].forEach((e, i) => {
    const name = Buffer.from(`${e.name}\0`);
    const data = Buffer.from(e.data ?? "");
    const [major, minor] = e.rdev ?? [0, 0];
    const nlink = (e.mode & 0o170000) === S_IFDIR ? 2 : 1;
    const fields = [e.name === "TRAILER!!!" ? 0 : i + 1, e.mode, 0, 0, nlink, 0, data.length, 0, 0, major, minor, name.length, 0];
    const header = Buffer.from(`070701${fields.map((f) => f.toString(16).padStart(8, "0")).join("")}`);
    parts.push(header, name, pad(header.length + name.length), data, pad(data.length));
  });
  return Buffer.concat(parts);
}

/** /init for the kit: mounts, lists PCI devices, a shell on the console, power off when it exits. */
export const GUEST_INIT = `#!/bin/sh
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
export PATH=/bin
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "vfio-user-ts guest: Linux $(uname -r) with busybox. PCI devices (vendor:device class):"
for d in /sys/bus/pci/devices/*; do echo "  \${d##*/}  $(cat $d/vendor):$(cat $d/device)  $(cat $d/class)"; done
echo "BARs: cat /sys/bus/pci/devices/ADDR/resource; registers: devmem ADDRESS 32 [VALUE]; drivers: insmod /lib/modules/uio.ko"
if grep -q vfio_user_ts.batch /proc/cmdline; then echo "no terminal: powering off"; poweroff -f; fi
echo "'exit' or 'poweroff -f' ends QEMU."
setsid cttyhack sh || sh
poweroff -f
`;

function writeInitrd(kitDir: string, out: string): void {
  const overlay = cpio([
    { name: "dev", mode: S_IFDIR | 0o755 },
    { name: "dev/console", mode: S_IFCHR | 0o600, rdev: [5, 1] },
    { name: "proc", mode: S_IFDIR | 0o755 },
    { name: "sys", mode: S_IFDIR | 0o755 },
    { name: "tmp", mode: S_IFDIR | 0o1777 },
    { name: "init", mode: S_IFREG | 0o755, data: GUEST_INIT },
  ]);
  writeFileSync(out, Buffer.concat([readFileSync(path.join(kitDir, "initramfs-base.cpio.gz")), gzipSync(overlay)]));
}

// ---------------------------------------------------------------------------
// The command
// ---------------------------------------------------------------------------

export const QEMU_USAGE = `Usage: vfio-user-ts qemu --socket PATH [options] [-- QEMU ARGS...]

Starts QEMU 11.1 or newer attached to a running 'vfio-user-ts serve' on
PATH: q35, memfd-backed guest RAM (so the server DMAs through mmap), the
device as vfio-user-pci. Without a guest, QEMU sits in its firmware with
the device attached (on a terminal: the QEMU monitor, 'info pci', 'quit').

QEMU is the one on PATH when it is 11.1 or newer, else the Debian trixie
root of docker/qemu-root.sh (Debian 12): the socket's directory is then
made visible inside the root (see the README). VFIO_USER_QEMU=native|chroot
forces one.

Options:
  --socket PATH   the server's UNIX socket
  --mem SIZE      guest RAM (default 512M)
  --guest-kit     boot the Linux guest kit (docker/guest-kit.sh: Linux 6.12,
                  busybox, TCG) with a shell on this terminal; it lists the
                  PCI devices first (without a terminal it lists them and
                  powers off)
  --dry-run       print the command instead of running it
  -h, --help      this text

Everything after -- goes to QEMU as it is.`;

interface Plan {
  file: string;
  args: string[];
  /** Directory to remove when QEMU is done. */
  scratch: string | null;
}

function plan(env: Exclude<QemuEnv, { mode: "none" }>, socket: string, mem: string, kit: boolean, extra: string[]): Plan {
  const inside = env.mode === "root" ? insideRoot(env.root, socket) : null;
  // with the host's /tmp bound over the root's, scratch files go in the host's /tmp, same path inside
  const bindTmp = env.mode === "root" && inside === null && underTmp(socket);
  const inRoot = env.mode === "root" && !bindTmp;
  let scratch: string | null = null;
  const scratchDir = (): string => {
    scratch ??= mkdtempSync(path.join(inRoot ? path.join((env as { root: string }).root, "tmp") : bindTmp ? "/tmp" : (process.env.TMPDIR ?? "/tmp"), "vfio-user-qemu-"));
    return scratch;
  };
  /** A host path as QEMU sees it. */
  const asSeen = (p: string) => (inRoot ? (insideRoot((env as { root: string }).root, p) ?? p) : p);
  const binds: string[] = [];
  let seen = socket;
  if (env.mode === "root") {
    if (inside !== null) seen = inside;
    else if (bindTmp) binds.push("/tmp");
    else {
      // the socket's directory on a fresh mount point under the root's tmp/
      const mountPoint = path.join(scratchDir(), "socket-dir");
      mkdirSync(mountPoint);
      binds.push(`${path.dirname(socket)}:${asSeen(mountPoint)}`);
      seen = path.join(asSeen(mountPoint), path.basename(socket));
    }
  }
  const args = qemuArgs(seen, mem);
  if (kit) {
    const dir = guestKitDir(env);
    if (!existsSync(path.join(dir, ".ready"))) {
      throw new CommandError(`the guest kit ${dir} is not built; as root: sh ${GUEST_KIT_SCRIPT} setup (a few minutes, needs deb.debian.org)`);
    }
    const initrd = path.join(scratchDir(), "initrd.gz");
    writeInitrd(dir, initrd);
    // TCG, as the e2e tests boot it: KVM under nested virtualisation is not always sound
    args[1] = "q35,accel=tcg";
    const kernel = env.mode === "root" ? (insideRoot(env.root, path.join(dir, "vmlinuz")) ?? path.join(dir, "vmlinuz")) : path.join(dir, "vmlinuz");
    // without a terminal there is nobody to type: the guest lists its devices and powers off
    const append = `console=ttyS0 quiet panic=-1${process.stdin.isTTY ? "" : " vfio_user_ts.batch=1"}`;
    args.push("-kernel", kernel, "-initrd", asSeen(initrd), "-append", append, "-serial", "mon:stdio", "-no-reboot");
  } else if (process.stdin.isTTY && !extra.some((a) => a === "-monitor" || a === "-serial" || a === "-nographic")) {
    args.push("-monitor", "stdio");
  }
  args.push(...extra);
  if (env.mode === "native") return { file: QEMU, args, scratch };
  return { file: "sh", args: [QEMU_ROOT_SCRIPT, "exec", ...binds.flatMap((b) => ["--bind", b]), QEMU, ...args], scratch };
}

/** A failure that is not a usage error: one line, exit 1. */
export class CommandError extends Error {}

export async function qemuMain(argv: string[]): Promise<number> {
  const dash = argv.indexOf("--");
  const own = dash >= 0 ? argv.slice(0, dash) : argv;
  const extra = dash >= 0 ? argv.slice(dash + 1) : [];
  const { values } = parseCommandArgs("qemu", own, {
    socket: { type: "string" },
    mem: { type: "string", default: "512M" },
    "guest-kit": { type: "boolean", default: false },
    "dry-run": { type: "boolean", default: false },
    help: { type: "boolean", short: "h", default: false },
  });
  if (values.help) {
    console.log(QEMU_USAGE);
    return 0;
  }
  if (!values.socket) throw new UsageError("qemu needs --socket PATH (the socket 'vfio-user-ts serve' listens on)", "qemu");
  let memBytes: bigint;
  try {
    memBytes = parseSize(values.mem!);
  } catch (err) {
    throw new UsageError(`--mem: ${(err as Error).message}`, "qemu");
  }
  if (memBytes < 16n << 20n || memBytes % (1n << 20n) !== 0n) throw new UsageError(`--mem must be whole MiB, at least 16M, got '${values.mem}'`, "qemu");
  const mem = formatSize(memBytes);
  const socket = path.resolve(values.socket);
  if (!values["dry-run"] && !(existsSync(socket) && statSync(socket).isSocket())) {
    throw new CommandError(`no server socket at ${socket}; start one first: vfio-user-ts serve --device NAME --socket ${values.socket}`);
  }
  const env = qemuEnv();
  if (env.mode === "none") throw new CommandError(`no QEMU 11.1 or newer here: ${env.why}`);
  const p = plan(env, socket, mem, values["guest-kit"]!, extra);
  const shown = [p.file, ...p.args].map(shellQuote).join(" ");
  if (values["dry-run"]) {
    console.log(shown);
    if (p.scratch) rmSync(p.scratch, { recursive: true, force: true });
    return 0;
  }
  console.error(`vfio-user-ts qemu: ${env.version}${env.mode === "root" ? ` (from ${env.root})` : ""}, attaching to ${socket}`);
  console.error(`  ${shown}`);
  const child = spawn(p.file, p.args, { stdio: "inherit" });
  const done = new Promise<number>((resolve) => child.once("exit", (code, signal) => resolve(code ?? (signal ? 128 + 2 : 1))));
  const cleanup = () => {
    if (p.scratch) rmSync(p.scratch, { recursive: true, force: true });
  };
  // also on a second Ctrl-C, which exits without waiting
  process.once("exit", cleanup);
  const off = onInterrupt("running QEMU", async () => {
    child.kill("SIGTERM");
    await done;
    cleanup();
  });
  const code = await done;
  off();
  cleanup();
  return code;
}

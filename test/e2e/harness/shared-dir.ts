/**
 * Where QEMU runs and which directories it shares with the test. Two modes:
 *
 * - `chroot` (the default wherever docker/qemu-root.sh has built its root):
 *   QEMU runs with `chroot ROOT`, so a host path `ROOT/tmp/x/sock` is
 *   `/tmp/x/sock` inside. UNIX sockets work across the boundary because it
 *   is the same inode on the same filesystem; only the spelling of the path
 *   differs.
 * - `native` (the Docker image, or any machine with QEMU >= 11.1 installed):
 *   `qemu-system-x86_64` from PATH runs directly and shared directories are
 *   plain temp directories, spelled the same on both sides.
 *
 * `VFIO_USER_QEMU=native|chroot` picks one; unset (or `auto`), the root wins
 * when it is set up, else a `qemu-system-x86_64` >= 11.1 on PATH, else
 * chroot (whose "not set up" message says what to do).
 */
import { execFileSync } from "node:child_process";
import { existsSync, mkdtempSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

/** The repository root (this file is test/e2e/harness/shared-dir.ts). */
export const REPO_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");
/** The launcher script: `qemu-root.sh exec CMD...` runs CMD inside the root. */
export const QEMU_ROOT_SCRIPT = join(REPO_ROOT, "docker/qemu-root.sh");
const DEFAULT_ROOT = "/var/cache/vfio-user-ts/qemu-root";
/** Written by `qemu-root.sh setup` once the root is complete. */
const STAMP = ".vfio-user-ts-ready";
const QEMU_BINARY = "qemu-system-x86_64";
/** The oldest QEMU with a vfio-user-pci client that behaves as QEMU.md describes. */
const MIN_QEMU: readonly [number, number] = [11, 1];

export type QemuMode = "chroot" | "native";

export interface SharedDir {
  /** The directory as the test sees it (chroot mode: `<root>/tmp/vfu-XXXXXX`). */
  readonly host: string;
  /** The same directory as QEMU sees it (chroot mode: `/tmp/vfu-XXXXXX`; native: `host`). */
  readonly guest: string;
  /** Remove the directory and everything in it (idempotent, never throws). */
  cleanup(): void;
}

let cachedRoot: string | undefined;
let cachedMode: QemuMode | undefined;

/** Which way QEMU runs here (see the file comment). Cached per process. */
export function qemuMode(): QemuMode {
  if (cachedMode !== undefined) return cachedMode;
  const env = (process.env.VFIO_USER_QEMU ?? "").trim();
  if (env === "native" || env === "chroot") {
    cachedMode = env;
  } else if (env !== "" && env !== "auto") {
    throw new Error(`VFIO_USER_QEMU=${env}: expected native, chroot or auto`);
  } else if (qemuRootReady()) {
    cachedMode = "chroot";
  } else {
    const v = nativeVersion();
    cachedMode = v.ok && versionAtLeast(v.version) ? "native" : "chroot";
  }
  return cachedMode;
}

/** Whether `qemu-root.sh setup` has completed the root. */
export function qemuRootReady(): boolean {
  return existsSync(join(qemuRootPath(), STAMP));
}

/** How to start QEMU: `file` then `args`, then QEMU's own arguments. */
export function qemuLauncher(): { file: string; args: string[] } {
  return qemuMode() === "native" ? { file: QEMU_BINARY, args: [] } : { file: "sh", args: [QEMU_ROOT_SCRIPT, "exec", QEMU_BINARY] };
}

/**
 * The QEMU root's host path: `$VFIO_USER_QEMU_ROOT`, else what
 * `docker/qemu-root.sh path` prints (the same default the script uses).
 */
export function qemuRootPath(): string {
  if (cachedRoot !== undefined) return cachedRoot;
  const env = process.env.VFIO_USER_QEMU_ROOT;
  let root: string;
  if (env !== undefined && env !== "") {
    root = env;
  } else {
    try {
      root = execFileSync("sh", [QEMU_ROOT_SCRIPT, "path"], { encoding: "utf8", timeout: 10_000 }).trim();
    } catch {
      root = DEFAULT_ROOT;
    }
  }
  cachedRoot = resolve(root);
  return cachedRoot;
}

/**
 * QEMU's spelling of a host path: in chroot mode the path inside the root
 * (throws for a path outside it, which QEMU could not reach); in native mode
 * the path itself.
 */
export function toGuestPath(hostPath: string): string {
  const abs = resolve(hostPath);
  if (qemuMode() === "native") return abs;
  const root = qemuRootPath();
  if (abs === root) return "/";
  if (!abs.startsWith(root + "/")) {
    throw new Error(`path ${hostPath} is outside the QEMU root ${root}; QEMU (chrooted) cannot reach it`);
  }
  return abs.slice(root.length);
}

/** A fresh directory visible to QEMU: under `<root>/tmp/` (chroot), or the system temp dir (native). */
export function makeSharedDir(prefix = "vfu-"): SharedDir {
  let parent = tmpdir();
  if (qemuMode() === "chroot") {
    parent = join(qemuRootPath(), "tmp");
    if (!existsSync(parent)) throw new Error(`QEMU root ${qemuRootPath()} has no tmp/ directory (is it set up? run: docker/qemu-root.sh setup)`);
  }
  const host = mkdtempSync(join(parent, prefix));
  return { host, guest: toGuestPath(host), cleanup: once(() => rmSync(host, { recursive: true, force: true })) };
}

/**
 * An existing directory that QEMU can reach (e.g. one a script made next to
 * a server's socket), as a SharedDir. Its owner removes it: `cleanup` does
 * nothing.
 */
export function sharedDirAt(hostPath: string): SharedDir {
  const host = resolve(hostPath);
  if (!statSync(host).isDirectory()) throw new Error(`${hostPath} is not a directory`);
  return { host, guest: toGuestPath(host), cleanup: () => {} };
}

/** Runs `fn` the first time only and never throws: a leftover socket file in a temp dir is harmless. */
function once(fn: () => void): () => void {
  let done = false;
  return () => {
    if (done) return;
    done = true;
    try {
      fn();
    } catch {
      // best effort
    }
  };
}

export type QemuAvailability = { ok: true; version: string } | { ok: false; why: string };

let cachedAvailability: QemuAvailability | undefined;

/**
 * Whether the harness can run QEMU here. Chroot mode: the root exists and
 * is complete and `qemu-system-x86_64 --version` runs inside it (as root,
 * or as another user through a user namespace, see qemu-root.sh). Native
 * mode: `qemu-system-x86_64` on PATH is 11.1 or newer. Cached per process.
 */
export function qemuAvailable(): QemuAvailability {
  if (cachedAvailability !== undefined) return cachedAvailability;
  try {
    cachedAvailability = qemuMode() === "native" ? probeNative() : probeRoot();
  } catch (e) {
    cachedAvailability = { ok: false, why: (e as Error).message };
  }
  return cachedAvailability;
}

function probeNative(): QemuAvailability {
  const v = nativeVersion();
  if (!v.ok) return { ok: false, why: `native QEMU (VFIO_USER_QEMU=native): ${v.why}` };
  if (!versionAtLeast(v.version)) return { ok: false, why: `native QEMU is too old for vfio-user-pci (need >= ${MIN_QEMU.join(".")}): ${v.version}` };
  return v;
}

function nativeVersion(): QemuAvailability {
  try {
    const out = execFileSync(QEMU_BINARY, ["--version"], { encoding: "utf8", timeout: 20_000, stdio: ["ignore", "pipe", "pipe"] });
    return versionLine(out);
  } catch (e) {
    return { ok: false, why: `${QEMU_BINARY} --version failed: ${failure(e)}` };
  }
}

function versionLine(out: string): QemuAvailability {
  const version = out.split("\n")[0]?.trim() ?? "";
  if (!/^QEMU emulator version \d+\.\d+/.test(version)) {
    return { ok: false, why: `unexpected output from ${QEMU_BINARY} --version: ${JSON.stringify(out.slice(0, 200))}` };
  }
  return { ok: true, version };
}

function versionAtLeast(line: string): boolean {
  const m = /version (\d+)\.(\d+)/.exec(line);
  if (!m) return false;
  const [major, minor] = [Number(m[1]), Number(m[2])];
  return major > MIN_QEMU[0] || (major === MIN_QEMU[0] && minor >= MIN_QEMU[1]);
}

function failure(e: unknown): string {
  const err = e as { message?: string; stderr?: string };
  const stderr = typeof err.stderr === "string" ? err.stderr.trim() : "";
  return stderr || err.message || String(e);
}

function probeRoot(): QemuAvailability {
  if (process.platform !== "linux") return { ok: false, why: `QEMU root needs Linux (platform is ${process.platform})` };
  if (!existsSync(QEMU_ROOT_SCRIPT)) return { ok: false, why: `launcher ${QEMU_ROOT_SCRIPT} is missing` };
  const root = qemuRootPath();
  if (!qemuRootReady()) {
    return {
      ok: false,
      why: `QEMU root ${root} is not set up (no ${STAMP}); run as root: docker/qemu-root.sh setup (or install QEMU >= ${MIN_QEMU.join(".")} and set VFIO_USER_QEMU=native)`,
    };
  }
  if (!existsSync(join(root, "usr/bin", QEMU_BINARY))) return { ok: false, why: `QEMU root ${root} has no usr/bin/${QEMU_BINARY}` };
  try {
    if (!statSync(join(root, "tmp")).isDirectory()) return { ok: false, why: `${root}/tmp is not a directory` };
  } catch {
    return { ok: false, why: `${root}/tmp is missing` };
  }
  try {
    const out = execFileSync("sh", [QEMU_ROOT_SCRIPT, "exec", QEMU_BINARY, "--version"], {
      encoding: "utf8",
      timeout: 20_000,
      stdio: ["ignore", "pipe", "pipe"],
    });
    return versionLine(out);
  } catch (e) {
    const uid = typeof process.getuid === "function" ? process.getuid() : 0;
    const hint = uid !== 0 ? ` (uid ${uid}: entering the root needs root or unprivileged user namespaces)` : "";
    return { ok: false, why: `${QEMU_BINARY} --version failed in ${root}${hint}: ${failure(e)}` };
  }
}

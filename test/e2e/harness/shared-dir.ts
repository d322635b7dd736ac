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

/**
 * Which QEMU: Debian's 11.1.3 (`debian`, every ordinary e2e test), or the
 * vfio-user migration prototype built by docker/qemu-mig.sh into a copy of
 * the root (`mig`: the prototype plus three client bug fixes; `mig-asfound`:
 * the prototype as its authors left it). The migrating builds run only in
 * chroot mode, from their own root.
 */
export type QemuBuild = "debian" | "mig" | "mig-asfound";

const MIG_ROOT_DEFAULT = "/var/cache/vfio-user-ts/qemu-mig-root";
/** The migrating builds' binaries, as paths inside their root (docker/qemu-mig.sh). */
const MIG_BINARIES: Readonly<Record<Exclude<QemuBuild, "debian">, string>> = {
  mig: "/opt/qemu-vfio-user-mig/bin/qemu-system-x86_64",
  "mig-asfound": "/opt/qemu-vfio-user-mig-asfound/bin/qemu-system-x86_64",
};
export const QEMU_MIG_SCRIPT = join(REPO_ROOT, "docker/qemu-mig.sh");

/** The migrating builds' root: `$VFIO_USER_QEMU_MIG_ROOT` or the default. */
export function qemuMigRootPath(): string {
  const env = process.env.VFIO_USER_QEMU_MIG_ROOT;
  return resolve(env !== undefined && env !== "" ? env : MIG_ROOT_DEFAULT);
}

/** The root a build runs in (chroot), or null when it runs natively. */
function rootOf(build: QemuBuild): string | null {
  if (build !== "debian") return qemuMigRootPath();
  return qemuMode() === "native" ? null : qemuRootPath();
}

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

/**
 * How to start QEMU: `file` then `args`, then QEMU's own arguments, with
 * `env` added to the environment (the root that qemu-root.sh enters).
 */
export function qemuLauncher(build: QemuBuild = "debian"): { file: string; args: string[]; env: Record<string, string> } {
  if (build !== "debian") {
    return { file: "sh", args: [QEMU_ROOT_SCRIPT, "exec", MIG_BINARIES[build]], env: { VFIO_USER_QEMU_ROOT: qemuMigRootPath() } };
  }
  return qemuMode() === "native"
    ? { file: QEMU_BINARY, args: [], env: {} }
    : { file: "sh", args: [QEMU_ROOT_SCRIPT, "exec", QEMU_BINARY], env: { VFIO_USER_QEMU_ROOT: qemuRootPath() } };
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
 * QEMU's spelling of a host path: inside one of the roots (Debian's, or the
 * migrating builds') the path inside that root; in native mode, a path
 * outside every root is itself. In chroot mode a path outside the roots
 * throws: QEMU could not reach it.
 */
export function toGuestPath(hostPath: string): string {
  const abs = resolve(hostPath);
  for (const root of [qemuMigRootPath(), ...(qemuMode() === "native" ? [] : [qemuRootPath()])]) {
    if (abs === root) return "/";
    if (abs.startsWith(root + "/")) return abs.slice(root.length);
  }
  if (qemuMode() === "native") return abs;
  throw new Error(`path ${hostPath} is outside the QEMU root ${qemuRootPath()}; QEMU (chrooted) cannot reach it`);
}

/**
 * A fresh directory visible to the given QEMU build: under `<root>/tmp/`
 * (chroot), or the system temp dir (native). Both QEMUs of a migration use
 * the same build, hence one directory.
 */
export function makeSharedDir(prefix = "vfu-", build: QemuBuild = "debian"): SharedDir {
  const root = rootOf(build);
  let parent = tmpdir();
  if (root !== null) {
    parent = join(root, "tmp");
    if (!existsSync(parent)) throw new Error(`QEMU root ${root} has no tmp/ directory (is it set up? run: ${build === "debian" ? "docker/qemu-root.sh setup" : "docker/qemu-mig.sh setup"})`);
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
const cachedMigAvailability = new Map<QemuBuild, QemuAvailability>();

/**
 * Whether a migrating build can run here: its root is there, the binary is
 * built (docker/qemu-mig.sh setup) and `--version` runs inside the root and
 * names the vfio-user-mig build. Cached per process.
 */
export function qemuMigAvailable(build: Exclude<QemuBuild, "debian"> = "mig"): QemuAvailability {
  const hit = cachedMigAvailability.get(build);
  if (hit) return hit;
  let r: QemuAvailability;
  try {
    r = probeMig(build);
  } catch (e) {
    r = { ok: false, why: (e as Error).message };
  }
  cachedMigAvailability.set(build, r);
  return r;
}

function probeMig(build: Exclude<QemuBuild, "debian">): QemuAvailability {
  const root = qemuMigRootPath();
  const setup = `docker/qemu-mig.sh setup ${build === "mig" ? "fixed" : "asfound"} (as root; needs the qemu-mig build scripts of ../shared/qemu-mig)`;
  if (process.platform !== "linux") return { ok: false, why: `the migrating QEMU runs in a chroot and needs Linux (platform is ${process.platform})` };
  if (!existsSync(join(root, STAMP))) return { ok: false, why: `the migrating QEMU's root ${root} does not exist; run ${setup}` };
  const bin = MIG_BINARIES[build];
  if (!existsSync(join(root, bin))) return { ok: false, why: `the migrating QEMU (${build}) is not built: ${root}${bin} is missing; run ${setup}` };
  try {
    const launcher = qemuLauncher(build);
    const out = execFileSync(launcher.file, [...launcher.args, "--version"], {
      encoding: "utf8",
      timeout: 20_000,
      stdio: ["ignore", "pipe", "pipe"],
      env: { ...process.env, ...launcher.env },
    });
    const v = versionLine(out);
    if (v.ok && !out.includes("vfio-user-mig")) return { ok: false, why: `${root}${bin} is not the vfio-user-mig build: ${v.version}` };
    return v;
  } catch (e) {
    return { ok: false, why: `${bin} --version failed in ${root}: ${failure(e)}` };
  }
}

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

/**
 * Directories that both the test (host side) and QEMU (chrooted into the
 * Debian trixie root made by docker/qemu-root.sh) can see.
 *
 * QEMU runs with `chroot ROOT`, so a host path `ROOT/tmp/x/sock` is
 * `/tmp/x/sock` inside. UNIX sockets work across the boundary because it is
 * the same inode on the same filesystem; only the spelling of the path
 * differs.
 */
import { execFileSync } from "node:child_process";
import { existsSync, mkdtempSync, rmSync, statSync } from "node:fs";
import { basename, dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

/** The repository root (this file is test/e2e/harness/shared-dir.ts). */
export const REPO_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");
/** The launcher script: `qemu-root.sh exec CMD...` runs CMD inside the root. */
export const QEMU_ROOT_SCRIPT = join(REPO_ROOT, "docker/qemu-root.sh");
const DEFAULT_ROOT = "/var/cache/vfio-user-ts/qemu-root";
/** Written by `qemu-root.sh setup` once the root is complete. */
const STAMP = ".vfio-user-ts-ready";

export interface SharedDir {
  /** The directory as the test sees it: `<root>/tmp/vfu-XXXXXX`. */
  readonly host: string;
  /** The same directory as QEMU sees it inside the chroot: `/tmp/vfu-XXXXXX`. */
  readonly guest: string;
  /** Remove the directory and everything in it (idempotent, never throws). */
  cleanup(): void;
}

let cachedRoot: string | undefined;

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
 * The chroot-side spelling of a host path that lies inside the QEMU root.
 * Throws for a path outside the root (QEMU could not reach it).
 */
export function toGuestPath(hostPath: string): string {
  const root = qemuRootPath();
  const abs = resolve(hostPath);
  if (abs === root) return "/";
  if (!abs.startsWith(root + "/")) {
    throw new Error(`path ${hostPath} is outside the QEMU root ${root}; QEMU (chrooted) cannot reach it`);
  }
  return abs.slice(root.length);
}

/** A fresh directory under `<root>/tmp/`, visible to QEMU. */
export function makeSharedDir(prefix = "vfu-"): SharedDir {
  const root = qemuRootPath();
  const tmp = join(root, "tmp");
  if (!existsSync(tmp)) {
    throw new Error(`QEMU root ${root} has no tmp/ directory (is it set up? run: docker/qemu-root.sh setup)`);
  }
  const host = mkdtempSync(join(tmp, prefix));
  const guest = "/tmp/" + basename(host);
  let done = false;
  return {
    host,
    guest,
    cleanup() {
      if (done) return;
      done = true;
      try {
        rmSync(host, { recursive: true, force: true });
      } catch {
        // best effort: a leftover socket file in the root's /tmp is harmless
      }
    },
  };
}

export type QemuAvailability = { ok: true; version: string } | { ok: false; why: string };

let cachedAvailability: QemuAvailability | undefined;

/**
 * Whether the harness can run QEMU here: the root exists and is complete, we
 * are root (the launcher needs `unshare -m` and `chroot`), and
 * `qemu-system-x86_64 --version` runs inside it. Cached per process.
 */
export function qemuAvailable(): QemuAvailability {
  if (cachedAvailability !== undefined) return cachedAvailability;
  cachedAvailability = probe();
  return cachedAvailability;
}

function probe(): QemuAvailability {
  if (process.platform !== "linux") return { ok: false, why: `QEMU root needs Linux (platform is ${process.platform})` };
  if (!existsSync(QEMU_ROOT_SCRIPT)) return { ok: false, why: `launcher ${QEMU_ROOT_SCRIPT} is missing` };
  const root = qemuRootPath();
  if (!existsSync(join(root, STAMP))) {
    return { ok: false, why: `QEMU root ${root} is not set up (no ${STAMP}); run as root: docker/qemu-root.sh setup` };
  }
  if (!existsSync(join(root, "usr/bin/qemu-system-x86_64"))) {
    return { ok: false, why: `QEMU root ${root} has no usr/bin/qemu-system-x86_64` };
  }
  try {
    if (!statSync(join(root, "tmp")).isDirectory()) return { ok: false, why: `${root}/tmp is not a directory` };
  } catch {
    return { ok: false, why: `${root}/tmp is missing` };
  }
  if (typeof process.getuid === "function" && process.getuid() !== 0) {
    return { ok: false, why: `running QEMU in ${root} needs root (unshare -m, chroot); uid is ${process.getuid()}` };
  }
  try {
    const out = execFileSync("sh", [QEMU_ROOT_SCRIPT, "exec", "qemu-system-x86_64", "--version"], {
      encoding: "utf8",
      timeout: 20_000,
      stdio: ["ignore", "pipe", "pipe"],
    });
    const version = out.split("\n")[0]?.trim() ?? "";
    if (!/^QEMU emulator version/.test(version)) {
      return { ok: false, why: `unexpected output from qemu-system-x86_64 --version: ${JSON.stringify(out.slice(0, 200))}` };
    }
    return { ok: true, version };
  } catch (e) {
    const err = e as { message?: string; stderr?: string };
    const stderr = typeof err.stderr === "string" ? err.stderr.trim() : "";
    return { ok: false, why: `qemu-system-x86_64 --version failed in ${root}: ${stderr || err.message || String(e)}` };
  }
}

/**
 * libvfio-user as a peer for `npm run bench`, built on demand outside the
 * tree. Nothing of it is copied into this repository: the tarball and
 * lvu_big.c come from the peers folder (VFIO_USER_TS_PEERS, else
 * ../shared/peers or ../../shared/peers next to the repository; see its
 * README), the build goes to ~/.cache/vfio-user-ts/peers (or
 * $XDG_CACHE_HOME/vfio-user-ts/peers).
 *
 * The scratch copy gets the one change the peers README asks for:
 * samples/server.c's bar1_size 0x3000 -> 0x4000 (as shipped it refuses to
 * start, "BAR region size 12288 must be a power of 2", upstream issue #871).
 *
 * Build deps are Debian packages; when one is missing the peer rows say
 * which and the apt-get line, and the other rows still run.
 */
import { execFileSync } from "node:child_process";
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";

export const LVU_TARBALL = "libvfio-user-efd091b.tar.gz";
const LVU_DIR = "libvfio-user-efd091b";

export interface LvuPeer {
  /** samples/server (BAR1 4-byte reads, DMA, DMA logging): one client, then it exits. */
  server: string;
  /** lvu_big MIB: migration state of MIB MiB streamed with memcpy; one client, then it exits. */
  big: string;
  /** Where it was built. */
  dir: string;
  /** "built now" or "cached". */
  how: string;
}

export function peersDir(root: string): string | null {
  const env = process.env.VFIO_USER_TS_PEERS;
  const candidates = env ? [env] : [path.resolve(root, "../shared/peers"), path.resolve(root, "../../shared/peers")];
  return candidates.find((d) => existsSync(path.join(d, LVU_TARBALL))) ?? null;
}

const has = (cmd: string, args: string[]): boolean => {
  try {
    execFileSync(cmd, args, { stdio: "ignore" });
    return true;
  } catch {
    return false;
  }
};

/** Debian packages the libvfio-user build needs that this machine lacks. */
export function missingBuildDeps(): string[] {
  const missing: string[] = [];
  if (!has("meson", ["--version"])) missing.push("meson");
  if (!has("ninja", ["--version"])) missing.push("ninja-build");
  const pc = has("pkg-config", ["--version"]);
  if (!pc) missing.push("pkg-config");
  if (!pc || !has("pkg-config", ["--exists", "json-c"])) missing.push("libjson-c-dev");
  if (!pc || !has("pkg-config", ["--exists", "cmocka"])) missing.push("libcmocka-dev");
  if (!has("cc", ["--version"])) missing.push("gcc");
  return missing;
}

/** Builds (or finds) libvfio-user's sample server and lvu_big; the reason when it cannot. */
export function ensureLvu(root: string, log: (line: string) => void = () => {}): LvuPeer | { why: string } {
  const peers = peersDir(root);
  if (!peers) return { why: `no ${LVU_TARBALL} (set VFIO_USER_TS_PEERS to the folder that holds it and lvu_big.c)` };
  const cache = path.join(process.env.XDG_CACHE_HOME || path.join(os.homedir(), ".cache"), "vfio-user-ts", "peers");
  const dir = path.join(cache, LVU_DIR);
  const server = path.join(dir, "build-release/samples/server");
  const big = path.join(cache, "lvu_big");
  const stamp = path.join(cache, `${LVU_DIR}.built`);
  const bigSrc = path.join(peers, "lvu_big.c");
  const want = `${LVU_TARBALL} ${readFileSync(path.join(peers, LVU_TARBALL)).length} lvu_big.c ${readFileSync(bigSrc).length}\n`;
  if (existsSync(server) && existsSync(big) && existsSync(stamp) && readFileSync(stamp, "utf8") === want) {
    return { server, big, dir, how: "cached" };
  }
  const missing = missingBuildDeps();
  if (missing.length > 0) {
    return {
      why: `libvfio-user cannot be built: missing Debian package${missing.length > 1 ? "s" : ""} ${missing.join(" ")}; ` +
        `install with: sudo apt-get install -y ${missing.join(" ")}`,
    };
  }
  const logFile = path.join(cache, "build.log");
  try {
    mkdirSync(cache, { recursive: true });
    rmSync(dir, { recursive: true, force: true });
    rmSync(stamp, { force: true });
    mkdirSync(dir, { recursive: true });
    log(`building libvfio-user (efd091b) in ${dir} ...`);
    const run = (cmd: string, args: string[], cwd = dir): void => {
      const out = execFileSync(cmd, args, { cwd, stdio: ["ignore", "pipe", "pipe"], timeout: 600_000 });
      writeFileSync(logFile, `$ ${cmd} ${args.join(" ")}\n${out.toString()}`, { flag: "a" });
    };
    writeFileSync(logFile, "");
    run("tar", ["-xzf", path.join(peers, LVU_TARBALL), "-C", dir]);
    const sample = path.join(dir, "samples/server.c");
    const text = readFileSync(sample, "utf8");
    const patched = text.replace("const size_t bar1_size = 0x3000;", "const size_t bar1_size = 0x4000;");
    if (patched === text) return { why: "samples/server.c has no `bar1_size = 0x3000` to patch (not the expected libvfio-user tree)" };
    writeFileSync(sample, patched);
    run("meson", ["setup", "build-release", "--buildtype=release"]);
    run("ninja", ["-C", "build-release", "samples/server"]);
    const lib = path.join(dir, "build-release/lib");
    run("cc", ["-O2", `-I${path.join(dir, "include")}`, "-o", big, bigSrc, `-L${lib}`, "-lvfio-user", `-Wl,-rpath,${lib}`], cache);
    writeFileSync(stamp, want);
    return { server, big, dir, how: "built now" };
  } catch (err) {
    const e = err as { stderr?: Buffer; message: string };
    const detail = (e.stderr?.toString() ?? e.message).trim().split("\n").slice(-3).join(" / ");
    writeFileSync(logFile, `${detail}\n`, { flag: "a" });
    return { why: `libvfio-user build failed (${detail}); log: ${logFile}` };
  }
}

#!/usr/bin/env node
// The package's `install` script: builds the vfio_native addon with node-gyp
// against the headers of the Node that runs this script, so nothing is
// downloaded (node-gyp fetches headers from the internet unless it is given
// --nodedir). Where the headers are:
//
//   $npm_config_nodedir          set by the user (or an .npmrc): used as is
//   <execPath>/../../include/node  official tarballs, nvm, n, nodesource, Docker's
//                                node images, Debian's nodejs (/usr/bin/node ->
//                                /usr/include/node, from libnode-dev)
//   process.config node_prefix   the prefix Node was configured with
//   /usr, /usr/local             distribution packages
//
// A candidate counts when it has include/node/node_api.h and common.gypi
// (what node-gyp's configure reads). Plain JavaScript: it runs before any
// dependency is installed.
import { spawnSync } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));

/** Node's version from a header directory's node_version.h, or undefined. */
function headerVersion(dir) {
  try {
    const h = readFileSync(path.join(dir, "include/node/node_version.h"), "utf8");
    const part = (name) => new RegExp(`#define\\s+NODE_${name}_VERSION\\s+(\\d+)`).exec(h)?.[1] ?? "?";
    return ["MAJOR", "MINOR", "PATCH"].map(part).join(".");
  } catch {
    return undefined;
  }
}

function usable(dir) {
  const inc = path.join(dir, "include/node");
  return existsSync(path.join(inc, "node_api.h")) && existsSync(path.join(inc, "common.gypi"));
}

/**
 * The header directory (node-gyp's --nodedir) to build against: the first
 * usable candidate whose headers are this Node's version, else the first
 * usable one (an N-API addon builds against any Node 20+ headers), else null.
 */
export function findNodeDir(env = process.env) {
  if (env.npm_config_nodedir) return { dir: env.npm_config_nodedir, why: "npm_config_nodedir" };
  const candidates = [
    [path.resolve(path.dirname(process.execPath), ".."), `the running node (${process.execPath})`],
    [process.config?.variables?.node_prefix, "node's configured prefix"],
    ["/usr", "/usr"],
    ["/usr/local", "/usr/local"],
  ].filter(([dir]) => typeof dir === "string" && path.isAbsolute(dir) && usable(dir));
  const want = process.version.slice(1);
  const exact = candidates.find(([dir]) => headerVersion(dir) === want);
  const pick = exact ?? candidates[0];
  if (!pick) return null;
  return { dir: pick[0], why: `${pick[1]}, headers ${headerVersion(pick[0]) ?? "of unknown version"}` };
}

function main() {
  const found = findNodeDir();
  const args = ["rebuild", "--directory", here];
  if (found) {
    args.push(`--nodedir=${found.dir}`);
    console.log(`vfio-user-ts: building the native addon against ${found.dir} (${found.why})`);
  } else {
    console.warn(
      "vfio-user-ts: no Node headers found next to this node or in /usr, /usr/local (include/node/node_api.h); " +
        "node-gyp will try to download them. Install your distribution's Node headers (Debian: libnode-dev) " +
        "or set npm_config_nodedir to avoid that.",
    );
  }
  // npm hands lifecycle scripts the path of its own node-gyp; elsewhere, node-gyp from PATH
  const gyp = process.env.npm_config_node_gyp;
  const r = gyp ? spawnSync(process.execPath, [gyp, ...args], { stdio: "inherit" }) : spawnSync("node-gyp", args, { stdio: "inherit" });
  if (r.error) {
    console.error(`vfio-user-ts: cannot run node-gyp: ${r.error.message} (it ships with npm; run this through npm, or install node-gyp)`);
    return 1;
  }
  if (r.status !== 0) {
    console.error("vfio-user-ts: building the native addon failed; it needs a C compiler, make and python3 (Debian: build-essential python3)");
    return r.status ?? 1;
  }
  return 0;
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) process.exitCode = main();

/**
 * The addon builds on a fresh machine: the package's install script with an
 * empty HOME (no ~/.npmrc, so no nodedir setting, no node-gyp cache) and no
 * npm_config_* in the environment finds the running Node's headers and
 * builds without downloading anything. Runs in a copy of what the tarball
 * carries for the addon, so the repository's own build is not touched.
 */
import { spawnSync } from "node:child_process";
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, describe, expect, it } from "vitest";
import { freshEnv } from "./fresh-env.ts";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const NATIVE = "src/transport/native";

const work = mkdtempSync(path.join(tmpdir(), "vfu-install-"));
afterAll(() => rmSync(work, { recursive: true, force: true }));

describe("npm's install script with an empty HOME", () => {
  it("builds the addon against the running Node's headers, downloading nothing", () => {
    const home = path.join(work, "home");
    const pkg = path.join(work, "pkg");
    mkdirSync(home);
    mkdirSync(path.join(pkg, NATIVE), { recursive: true });
    for (const f of ["binding.gyp", "vfio_native.c", "build-addon.mjs"]) copyFileSync(path.join(ROOT, NATIVE, f), path.join(pkg, NATIVE, f));
    writeFileSync(path.join(pkg, "package.json"), JSON.stringify({ name: "addon-only", version: "0.0.0", scripts: { install: `node ${NATIVE}/build-addon.mjs` } }));
    const r = spawnSync("npm", ["run", "install", "--loglevel", "verbose"], { cwd: pkg, env: freshEnv(home), encoding: "utf8", timeout: 240_000 });
    const out = `${r.stdout}${r.stderr}`;
    expect(r.status, out).toBe(0);
    expect(out).toMatch(/vfio-user-ts: building the native addon against \S+ \(the running node \(.+\), headers \d+\.\d+\.\d+\)/);
    // node-gyp logs "gyp http GET" (and makes a devdir with the headers) when it downloads
    expect(out).not.toMatch(/gyp http GET|downloading/i);
    expect(existsSync(path.join(home, ".cache/node-gyp"))).toBe(false);
    expect(readdirSync(home).filter((f) => f !== ".npm")).toEqual([]);
    const addon = path.join(pkg, NATIVE, "build/Release/vfio_native.node");
    const load = spawnSync(process.execPath, ["-e", `const a = require(${JSON.stringify(addon)}); process.stdout.write(String(a.MAX_FDS))`], { encoding: "utf8" });
    expect(load.stdout, load.stderr).toBe("253");
  }, 300_000);
});

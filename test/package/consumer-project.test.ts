/**
 * [SLOW: npm pack + npm install into a fresh project, about a minute; part
 * of the default run, CI runs it.]
 *
 * The package as a device developer gets it: `npm pack`, then a fresh
 * project outside the repository installs the tarball (its dependencies
 * from the registry, with an empty HOME and no npm_config_* so the addon
 * build finds the headers by itself) and there
 *   - imports the API from plain Node (ESM) and from TypeScript compiled by
 *     the project's own tsc (strict, exactOptionalPropertyTypes, no
 *     skipLibCheck), and runs the compiled file;
 *   - runs the bin on a device defined in the project: `serve --device
 *     ./my-device.js` (and the .ts one through the project's tsx),
 *     `snapshot save/restore` against it, `check --device`, `demo migrate
 *     --device`.
 * The device has a timer: every command must exit by itself.
 */
import { spawn, spawnSync, type SpawnSyncReturns } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { homedir, tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { freshEnv } from "./fresh-env.ts";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const PKG = JSON.parse(readFileSync(path.join(ROOT, "package.json"), "utf8")) as { version: string; devDependencies: Record<string, string> };
/** The npm cache of this machine (filled by the repository's own npm ci): the registry is still what answers. */
const CACHE = path.join(process.env.HOME ?? homedir(), ".npm");

const work = mkdtempSync(path.join(tmpdir(), "vfu-consumer-"));
const home = path.join(work, "home");
const app = path.join(work, "my-device-project");
let tarball = "";
let env: NodeJS.ProcessEnv;

function sh(cmd: string, args: string[], cwd = app, timeout = 240_000): SpawnSyncReturns<string> {
  return spawnSync(cmd, args, { cwd, env, encoding: "utf8", timeout });
}

function ok(r: SpawnSyncReturns<string>, what: string): string {
  const out = `${r.stdout ?? ""}${r.stderr ?? ""}`;
  if (r.status !== 0) throw new Error(`${what} exited ${r.status ?? r.signal}${r.error ? ` (${r.error.message})` : ""}:\n${out.slice(-4000)}`);
  return r.stdout;
}

const BIN = () => path.join(app, "node_modules/.bin/vfio-user-ts");

const DEVICE_JS = `// A device written in its own project against the installed package.
import { defineOptions, parseOptions, readState } from "vfio-user-ts";

const options = defineOptions({ step: { type: "integer", min: 1, max: 100, default: 1, description: "ticks per timer period" } });

class Ticker {
  type = "ticker";
  stateVersion = 1;
  identity = { vendorId: 0x1234, deviceId: 0x71c4, classCode: 0xff0000 };
  capabilities = { msi: { vectors: 1 } };
  bars = [{ index: 0, size: 4096n, kind: "mem32", read: (o, d) => this.read(o, d), write: (o, d) => this.write(o, d) }];
  // device state: one scratch register; the timer's uptime counter is not state (not saved, not reset)
  s = { scratch: 0 };
  uptime = 0;
  timer = null;
  constructor(step) { this.step = step; }
  attach(ctx) {
    this.ctx = ctx;
    this.timer = setInterval(() => { if (this.ctx.running) this.uptime = (this.uptime + this.step) >>> 0; }, 5);
  }
  read(o, d) { if (d.length === 4) d.writeUInt32LE(o === 0 ? 0x71c40001 : o === 4 ? this.uptime : o === 8 ? this.s.scratch : 0); else d.fill(0xff); }
  write(o, d) { if (d.length === 4 && o === 8) this.s.scratch = d.readUInt32LE(0); }
  reset() { this.s = { scratch: 0 }; }
  saveState() { return { ...this.s }; }
  loadState(state) { const r = readState("ticker", state); this.s = { scratch: r.u32("scratch") }; r.end(); }
  dispose() { clearInterval(this.timer); }
}

export default { name: "ticker", description: "a timer device from outside the repository", options, create: (raw) => new Ticker(parseOptions("ticker", options, raw).step) };
`;

const DEVICE_TS = `import { defineOptions, parseOptions, readState, type BarDefinition, type Device, type DeviceContext, type DeviceFactory, type StateValue } from "vfio-user-ts";

const options = defineOptions({ step: { type: "integer", min: 1, max: 100, default: 1 } });

class Ticker implements Device {
  readonly type = "ticker";
  readonly stateVersion = 1;
  readonly identity = { vendorId: 0x1234, deviceId: 0x71c5, classCode: 0xff0000 };
  readonly bars: readonly BarDefinition[] = [
    { index: 0, size: 4096n, kind: "mem32", read: (o, d) => void d.writeUInt32LE(o === 4 ? this.uptime : o === 8 ? this.scratch : 0x71c50001), write: (o, d) => { if (o === 8 && d.length === 4) this.scratch = d.readUInt32LE(0); } },
  ];
  /** Not device state: counts while running, neither saved nor reset. */
  private uptime = 0;
  private scratch = 0;
  private timer: NodeJS.Timeout | undefined;
  private ctx!: DeviceContext;
  constructor(private readonly step: number) {}
  attach(ctx: DeviceContext): void {
    this.ctx = ctx;
    this.timer = setInterval(() => { if (this.ctx.running) this.uptime = (this.uptime + this.step) >>> 0; }, 5);
  }
  reset(): void { this.scratch = 0; }
  saveState(): StateValue { return { scratch: this.scratch }; }
  loadState(state: StateValue): void { const r = readState("ticker", state); this.scratch = r.u32("scratch"); r.end(); }
  dispose(): void { clearInterval(this.timer); }
}

export const factory: DeviceFactory = { name: "ticker-ts", description: "the same in TypeScript", options, create: (raw) => new Ticker(parseOptions("ticker", options, raw).step) };
`;

/** Compiled by the project's tsc: the API's types as a consumer sees them, then run. */
const TYPED_TS = `import { VfioUserServer, runCompliance, silentLogger, parseOptions, defineOptions, type DeviceFactory, type ComplianceReport } from "vfio-user-ts";
import { VfioUserClient, MigState, type MigrationDriverOptions } from "vfio-user-ts/client";
import { Command } from "vfio-user-ts/protocol";
import { factory } from "./my-device.ts";

const opts = defineOptions({ n: { type: "size", default: 4096n }, name: { type: "string" } });
const parsed = parseOptions("x", opts, { name: "y" });
const n: bigint = parsed.n;
const name: string | undefined = parsed.name;
const driverOptions: MigrationDriverOptions = { maxRounds: 2 };
const f: DeviceFactory = factory;

const server = new VfioUserServer({ device: f.create({ step: "2" }), log: silentLogger() });
const socket = process.argv[2]!;
server.listen(socket);
const client = await VfioUserClient.connect(socket);
await client.negotiate();
const id = await client.readU32(0, 0);
const state = await client.getMigState();
client.close();
await server.close();
const report: ComplianceReport = await runCompliance(f, { only: ["config-identity"] });
console.log(JSON.stringify({ id: id.toString(16), running: state === MigState.RUNNING, n: n.toString(), name, rounds: driverOptions.maxRounds, cmd: Command.REGION_READ, passed: report.passed }));
`;

const PLAIN_MJS = `import * as api from "vfio-user-ts";
import * as client from "vfio-user-ts/client";
import * as protocol from "vfio-user-ts/protocol";
console.log(JSON.stringify({
  server: typeof api.VfioUserServer, compliance: typeof api.runCompliance, options: typeof api.parseOptions,
  client: typeof client.VfioUserClient, driver: typeof client.MigrationDriver, version: protocol.Command.VERSION,
}));
`;

beforeAll(async () => {
  mkdirSync(home);
  mkdirSync(app);
  env = freshEnv(home);
  // the tarball (prepack builds dist/ with tsc)
  const packed = spawnSync("npm", ["pack", "--json", "--pack-destination", work], { cwd: ROOT, encoding: "utf8", timeout: 240_000, env: { ...env, HOME: process.env.HOME } });
  const list = JSON.parse(ok(packed, "npm pack").slice(ok(packed, "npm pack").indexOf("["))) as { filename: string; files: { path: string }[] }[];
  tarball = path.join(work, list[0]!.filename);
  (globalThis as { packedFiles?: string[] }).packedFiles = list[0]!.files.map((f) => f.path);
  writeFileSync(path.join(app, "package.json"), JSON.stringify({ name: "my-device-project", version: "1.0.0", private: true, type: "module" }, null, 2));
  const dev = PKG.devDependencies;
  ok(
    sh("npm", ["install", "--no-audit", "--no-fund", "--prefer-offline", "--cache", CACHE, tarball, `typescript@${dev.typescript}`, `tsx@${dev.tsx}`, `@types/node@${dev["@types/node"]}`]),
    "npm install (the tarball and the project's tools)",
  );
  writeFileSync(path.join(app, "my-device.js"), DEVICE_JS);
  writeFileSync(path.join(app, "my-device.ts"), DEVICE_TS);
  writeFileSync(path.join(app, "typed.ts"), TYPED_TS);
  writeFileSync(path.join(app, "plain.mjs"), PLAIN_MJS);
  writeFileSync(
    path.join(app, "tsconfig.json"),
    JSON.stringify({
      compilerOptions: { target: "es2022", module: "nodenext", strict: true, exactOptionalPropertyTypes: true, skipLibCheck: false, types: ["node"], outDir: "out", rewriteRelativeImportExtensions: true },
      files: ["typed.ts", "my-device.ts"],
    }),
  );
}, 400_000);

afterAll(() => rmSync(work, { recursive: true, force: true }));

describe("the packed package in a project of its own [slow]", () => {
  it("carries dist (JavaScript and .d.ts), the addon sources, README and LICENSE, and nothing else", () => {
    const files = (globalThis as { packedFiles?: string[] }).packedFiles!;
    for (const f of ["package.json", "README.md", "LICENSE", "dist/src/index.js", "dist/src/index.d.ts", "dist/src/client/index.d.ts", "dist/protocol/index.js", "src/cli/vfio-user-ts.mjs", "src/transport/native/binding.gyp", "src/transport/native/vfio_native.c", "src/transport/native/build-addon.mjs", "docker/qemu-root.sh"]) {
      expect(files, f).toContain(f);
    }
    const stray = files.filter((f) => f.startsWith("test/") || f.includes("node_modules") || f.includes("/build/") || (/\.ts$/.test(f) && !f.endsWith(".d.ts")));
    expect(stray).toEqual([]);
    const pkg = JSON.parse(readFileSync(path.join(app, "node_modules/vfio-user-ts/package.json"), "utf8")) as { dependencies: Record<string, string> };
    expect(Object.keys(pkg.dependencies)).not.toContain("tsx");
    expect(existsSync(path.join(app, "node_modules/vfio-user-ts/src/transport/native/build/Release/vfio_native.node"))).toBe(true);
  });

  it("imports from plain Node (ESM) and from TypeScript compiled by the project's tsc (strict, exactOptionalPropertyTypes)", () => {
    expect(JSON.parse(ok(sh(process.execPath, ["plain.mjs"]), "node plain.mjs"))).toEqual({ server: "function", compliance: "function", options: "function", client: "function", driver: "function", version: 1 });
    ok(sh(path.join(app, "node_modules/.bin/tsc"), ["-p", "."]), "tsc -p . (the consumer's own compiler)");
    const out = ok(sh(process.execPath, ["out/typed.js", path.join(work, "typed.sock")]), "node out/typed.js");
    expect(JSON.parse(out)).toEqual({ id: "71c50001", running: true, n: "4096", name: "y", rounds: 2, cmd: 9, passed: true });
  });

  it("vfio-user-ts --version runs from node_modules/.bin with plain node", () => {
    expect(ok(sh(BIN(), ["--version"]), "--version").trim()).toBe(`vfio-user-ts ${PKG.version} (Node ${process.version})`);
  });

  for (const device of ["./my-device.js", "./my-device.ts"]) {
    it(`serve --device ${device}: the QEMU command line printed, snapshot save, inspect, restore against it, Ctrl-C`, async () => {
      const socket = path.join(work, `${path.extname(device).slice(1)}.sock`);
      const p = spawn(BIN(), ["serve", "--device", device, "--socket", socket, "--log-format", "json"], { cwd: app, env, stdio: ["ignore", "pipe", "pipe"] });
      let out = "";
      let err = "";
      p.stdout!.on("data", (b: Buffer) => (out += b.toString()));
      p.stderr!.on("data", (b: Buffer) => (err += b.toString()));
      const exit = new Promise<number | null>((resolve) => p.on("exit", (code) => resolve(code)));
      const deadline = Date.now() + 30_000;
      // the whole banner: the attach lines come after the "serving" line
      while (!(out.includes("For a scripted guest") && existsSync(socket))) {
        if (Date.now() > deadline) throw new Error(`serve did not come up:\n${out}\n${err}`);
        await new Promise((r) => setTimeout(r, 50));
      }
      expect(out).toContain(`vfio-user-ts: serving '${device.endsWith(".ts") ? "ticker-ts" : "ticker"}' on ${socket}`);
      expect(out).toContain(`-device '{"driver":"vfio-user-pci","socket":{"path":`);
      const snap = path.join(work, `${path.extname(device).slice(1)}.snap`);
      expect(ok(sh(BIN(), ["snapshot", "save", "--socket", socket, "--file", snap]), "snapshot save")).toMatch(/^saved \d+ bytes of device state/);
      expect(ok(sh(BIN(), ["snapshot", "inspect", "--file", snap]), "snapshot inspect")).toContain("device 'ticker' state version 1");
      expect(ok(sh(BIN(), ["snapshot", "restore", "--socket", socket, "--file", snap]), "snapshot restore")).toMatch(/the device is RUNNING/);
      p.kill("SIGINT");
      expect(await exit).toBe(0);
      expect(existsSync(socket)).toBe(false);
    }, 60_000);
  }

  it("check --device ./my-device.js passes every check and exits by itself", () => {
    const out = ok(sh(BIN(), ["check", "--device", "./my-device.js", "--opt", "step=3"], app, 120_000), "check");
    expect(out).toContain("vfio-user-ts check: device 'ticker', options step=3");
    expect(out).toMatch(/^9 passed, 0 failed$/m);
  });

  it("demo migrate --device ./my-device.js migrates it between two servers and verifies it", () => {
    const out = ok(sh(BIN(), ["demo", "migrate", "--device", "./my-device.js", "--ram", "4M", "--svg", "rounds.svg"], app, 120_000), "demo migrate");
    expect(out).toMatch(/ok {3}device state {15}1 STATE record/);
    expect(out).toContain("migration verified");
    expect(readFileSync(path.join(app, "rounds.svg"), "utf8")).toMatch(/^<svg /);
  });
});

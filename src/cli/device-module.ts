/**
 * `--device NAME|PATH`: a device this package ships (devices/index.ts), or a
 * module of your own given as a path (`./my-device.js`, `../x/dev.ts`,
 * `/abs/dev.mjs`: anything with a slash or a JavaScript/TypeScript
 * extension). The module exports its DeviceFactory as the default export,
 * or as a named export `factory`:
 *
 *   export default { name: "timer", description: "...", create: (opts) => new Timer(opts) };
 *
 * A TypeScript module needs tsx in the device's project (`npm i -D tsx`):
 * the CLI registers it from there; Node versions that strip types load it
 * without.
 */
import { existsSync, readFileSync, statSync } from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";
import { pathToFileURL } from "node:url";
import { DEVICES, findDevice } from "../../devices/index.ts";
import type { Device, DeviceFactory, DeviceOptions } from "../device/api.ts";
import { OptionError } from "../device/options.ts";
import { UsageError } from "./usage.ts";

const TS_EXTENSIONS = /\.(?:ts|mts|cts|tsx)$/;

/** A device picked by --device: its factory, and what to pass to a child process. */
export interface ResolvedDevice {
  factory: DeviceFactory;
  /** The --device argument for another process: the name, or the module's absolute path. */
  spec: string;
  /** The module's absolute path when it came from a file. */
  module?: string;
}

/** Whether `spec` names a file rather than a shipped device. */
export function isDevicePath(spec: string): boolean {
  return spec.includes("/") || /\.(?:[cm]?js|[cm]?ts|tsx)$/.test(spec);
}

let tsxRegistered = false;

/** The ESM entry of tsx's API (tsx/esm/api) as installed from `from`, or null. */
function tsxApi(from: string): string | null {
  let cjs: string;
  try {
    cjs = createRequire(path.join(from, "noop.js")).resolve("tsx/esm/api");
  } catch {
    return null;
  }
  // require() resolves the CommonJS build; the ESM one is named by the package's exports
  for (let dir = path.dirname(cjs); dir !== path.dirname(dir); dir = path.dirname(dir)) {
    const manifest = path.join(dir, "package.json");
    if (!existsSync(manifest)) continue;
    const pkg = JSON.parse(readFileSync(manifest, "utf8")) as { name?: string; exports?: Record<string, { import?: { default?: string } | string }> };
    if (pkg.name !== "tsx") continue;
    const entry = pkg.exports?.["./esm/api"];
    const rel = typeof entry === "object" ? (typeof entry.import === "string" ? entry.import : entry.import?.default) : undefined;
    return rel ? path.join(dir, rel) : null;
  }
  return null;
}

/** Registers tsx found from `dir` (the device's project) or the working directory; false when there is none. */
async function registerTsx(dir: string): Promise<boolean> {
  if (tsxRegistered) return true;
  for (const from of [dir, process.cwd()]) {
    const api = tsxApi(from);
    if (api === null) continue;
    const tsx = (await import(pathToFileURL(api).href)) as { register(): unknown };
    tsx.register();
    tsxRegistered = true;
    return true;
  }
  return false;
}

function describeExports(mod: Record<string, unknown>): string {
  const names = Object.keys(mod);
  return names.length === 0 ? "it exports nothing" : `it exports ${names.map((n) => (n === "default" ? "a default" : `'${n}'`)).join(", ")}`;
}

/** Checks that `value` looks like a DeviceFactory; returns a reason when it does not. */
function notAFactory(value: unknown): string | null {
  if (typeof value !== "object" || value === null) return `it is ${value === null ? "null" : typeof value}, not an object`;
  const f = value as Partial<DeviceFactory>;
  if (typeof f.create !== "function") return "it has no create(options) function";
  if (typeof f.name !== "string" || f.name === "") return "it has no name";
  if (typeof f.description !== "string") return "it has no description";
  return null;
}

/** Loads a device module and returns its factory; throws UsageError with the reason. */
export async function loadDeviceModule(file: string, command: string): Promise<DeviceFactory> {
  const abs = path.resolve(file);
  if (!existsSync(abs)) throw new UsageError(`device module ${file} does not exist`, command);
  if (!statSync(abs).isFile()) throw new UsageError(`device module ${file} is not a file`, command);
  // from the TypeScript sources (in this repository) a TS loader is already in place
  const underTs = import.meta.url.endsWith(".ts");
  if (TS_EXTENSIONS.test(abs) && !underTs) await registerTsx(path.dirname(abs));
  let mod: Record<string, unknown>;
  try {
    mod = (await import(pathToFileURL(abs).href)) as Record<string, unknown>;
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    if (TS_EXTENSIONS.test(abs) && !tsxRegistered && !underTs && (e.code === "ERR_UNKNOWN_FILE_EXTENSION" || e.code === "ERR_UNSUPPORTED_TYPESCRIPT_SYNTAX")) {
      throw new UsageError(`device module ${file} is TypeScript: install tsx in its project (npm install --save-dev tsx) or compile it to JavaScript`, command);
    }
    throw new UsageError(`device module ${file} failed to load: ${e.message.split("\n")[0]}`, command);
  }
  const candidate = mod.default !== undefined ? mod.default : mod.factory;
  if (candidate === undefined) {
    throw new UsageError(`device module ${file} has no default export and no 'factory' export (${describeExports(mod)}); export a DeviceFactory`, command);
  }
  const why = notAFactory(candidate);
  if (why !== null) throw new UsageError(`device module ${file}: its ${mod.default !== undefined ? "default export" : "'factory' export"} is not a DeviceFactory: ${why}`, command);
  return candidate as DeviceFactory;
}

/** `--device` for `command`: a shipped device by name, or a module by path. */
export async function resolveDevice(spec: string, command: string, registry: readonly DeviceFactory[] = DEVICES): Promise<ResolvedDevice> {
  if (isDevicePath(spec)) {
    const factory = await loadDeviceModule(spec, command);
    const module = path.resolve(spec);
    return { factory, spec: module, module };
  }
  const factory = registry === DEVICES ? findDevice(spec) : registry.find((d) => d.name === spec);
  if (!factory) {
    throw new UsageError(`unknown device '${spec}'; known: ${registry.map((d) => d.name).join(", ")} (or a module path like ./my-device.js)`, command);
  }
  return { factory, spec };
}

/** factory.create(options), its errors as a usage error (an OptionError already names the device). */
export function createDevice(factory: DeviceFactory, options: DeviceOptions, command: string): Device {
  try {
    return factory.create(options);
  } catch (err) {
    const message = (err as Error).message;
    throw new UsageError(err instanceof OptionError ? message : `device '${factory.name}': ${message}`, command);
  }
}

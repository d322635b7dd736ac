/**
 * Device options (`--opt key=value` on the command line) checked against a
 * schema, the same way for every device: an unknown key is an error that
 * lists the known ones, every value is parsed for its type and checked for
 * its range, and the schema documents the options (`vfio-user-ts devices`
 * prints it). A device declares its schema with `defineOptions`, names it
 * in its factory's `options`, and reads the values in `create`:
 *
 *   const options = defineOptions({ start: { type: "integer", min: 0, default: 0 } });
 *   create(raw) { const { start } = parseOptions("counter", options, raw); ... }
 */
import type { DeviceOptions } from "./api.ts";

interface Described {
  /** A few words for `vfio-user-ts devices`. */
  readonly description?: string;
}

/** A JavaScript integer: decimal, or hex with 0x. */
export interface IntegerOption extends Described {
  readonly type: "integer";
  readonly default?: number;
  readonly min?: number;
  readonly max?: number;
}

/** A 64-bit value (addresses, masks): decimal or 0x hex, as a bigint. */
export interface BigintOption extends Described {
  readonly type: "bigint";
  readonly default?: bigint;
  readonly min?: bigint;
  readonly max?: bigint;
}

/** A byte count: 4096, 0x1000, 64K, 256M, 1G, 2T (binary units; KiB, MB... also read as binary). */
export interface SizeOption extends Described {
  readonly type: "size";
  readonly default?: bigint;
  readonly min?: bigint;
  readonly max?: bigint;
  readonly powerOfTwo?: boolean;
}

/** true/false, 1/0, yes/no, on/off. */
export interface BooleanOption extends Described {
  readonly type: "boolean";
  readonly default?: boolean;
}

export interface StringOption extends Described {
  readonly type: "string";
  readonly default?: string;
  /** The only values accepted, when given. */
  readonly choices?: readonly string[];
}

export type OptionSpec = IntegerOption | BigintOption | SizeOption | BooleanOption | StringOption;

/** Option names to their specs. */
export type OptionSchema = Readonly<Record<string, OptionSpec>>;

type ValueOf<S extends OptionSpec> = S extends IntegerOption ? number : S extends BigintOption | SizeOption ? bigint : S extends BooleanOption ? boolean : string;

/** What parseOptions returns: each option's value, `undefined` only for an absent option without a default. */
export type OptionValues<S extends OptionSchema> = {
  -readonly [K in keyof S]: S[K] extends { default: infer D } ? (undefined extends D ? ValueOf<S[K]> | undefined : ValueOf<S[K]>) : ValueOf<S[K]> | undefined;
};

/** A bad `--opt`: the CLI prints the message as it is. */
export class OptionError extends Error {
  override readonly name = "OptionError";
}

/** Keeps the schema's literal types (so defaults make values non-optional). */
export function defineOptions<const S extends OptionSchema>(schema: S): S {
  return schema;
}

const UNITS: Readonly<Record<string, bigint>> = { "": 1n, k: 1n << 10n, m: 1n << 20n, g: 1n << 30n, t: 1n << 40n };
const SIZE = /^(0x[0-9a-f]+|[0-9]+)(?:([kmgt])(?:i?b)?)?$/i;
const INTEGER = /^-?(?:0x[0-9a-f]+|[0-9]+)$/i;

/** "64M" -> 67108864n; throws OptionError for anything that is not a byte count. */
export function parseSize(text: string): bigint {
  const m = SIZE.exec(text.trim());
  if (!m) {
    throw new OptionError(`'${text}' is not a size like 4096, 64K, 256M or 1G`);
  }
  return BigInt(m[1]!) * UNITS[(m[2] ?? "").toLowerCase()]!;
}

/** 67108864n -> "64M"; sizes that are not a whole unit stay in bytes. */
export function formatSize(bytes: bigint): string {
  for (const unit of ["T", "G", "M", "K"] as const) {
    const u = UNITS[unit.toLowerCase()]!;
    if (bytes >= u && bytes % u === 0n) return `${bytes / u}${unit}`;
  }
  return String(bytes);
}

function parseInteger(text: string): bigint {
  if (!INTEGER.test(text.trim())) throw new OptionError(`'${text}' is not an integer (decimal, or hex with 0x)`);
  const t = text.trim();
  return t.startsWith("-") ? -BigInt(t.slice(1)) : BigInt(t);
}

function parseBoolean(text: string): boolean {
  const t = text.trim().toLowerCase();
  if (["1", "true", "yes", "on"].includes(t)) return true;
  if (["0", "false", "no", "off"].includes(t)) return false;
  throw new OptionError(`'${text}' is not a boolean (true/false, 1/0, yes/no, on/off)`);
}

function hex(v: bigint): string {
  return v > 0xffffn ? `0x${v.toString(16)}` : String(v);
}

function range(min: bigint | number | undefined, max: bigint | number | undefined, show: (v: bigint) => string): string {
  const lo = min === undefined ? undefined : show(BigInt(min));
  const hi = max === undefined ? undefined : show(BigInt(max));
  if (lo !== undefined && hi !== undefined) return `${lo}..${hi}`;
  if (lo !== undefined) return `>= ${lo}`;
  if (hi !== undefined) return `<= ${hi}`;
  return "";
}

function checkRange(v: bigint, min: bigint | number | undefined, max: bigint | number | undefined, show: (v: bigint) => string): void {
  if ((min !== undefined && v < BigInt(min)) || (max !== undefined && v > BigInt(max))) {
    throw new OptionError(`${show(v)} is out of range (${range(min, max, show)})`);
  }
}

function parseValue(spec: OptionSpec, text: string): unknown {
  switch (spec.type) {
    case "integer": {
      const v = parseInteger(text);
      checkRange(v, spec.min ?? Number.MIN_SAFE_INTEGER, spec.max ?? Number.MAX_SAFE_INTEGER, String);
      return Number(v);
    }
    case "bigint": {
      const v = parseInteger(text);
      checkRange(v, spec.min, spec.max, hex);
      return v;
    }
    case "size": {
      const v = parseSize(text);
      checkRange(v, spec.min, spec.max, formatSize);
      if (spec.powerOfTwo && (v === 0n || (v & (v - 1n)) !== 0n)) throw new OptionError(`${formatSize(v)} is not a power of two`);
      return v;
    }
    case "boolean":
      return parseBoolean(text);
    case "string":
      if (spec.choices && !spec.choices.includes(text)) throw new OptionError(`'${text}' is not one of ${spec.choices.join(", ")}`);
      return text;
  }
}

/**
 * Checks `options` against `schema` and returns the typed values (defaults
 * filled in). Throws OptionError naming the device, the option and the
 * reason: `edu: unknown option 'foo' (known: dma-mask)`,
 * `edu: dma-mask=abc: 'abc' is not an integer (decimal, or hex with 0x)`.
 */
export function parseOptions<S extends OptionSchema>(device: string, schema: S, options: DeviceOptions): OptionValues<S> {
  const known = Object.keys(schema);
  for (const key of Object.keys(options)) {
    if (!Object.hasOwn(schema, key)) {
      throw new OptionError(`${device}: unknown option '${key}' (${known.length > 0 ? `known: ${known.join(", ")}` : "it takes no options"})`);
    }
  }
  const out: Record<string, unknown> = {};
  for (const [key, spec] of Object.entries(schema)) {
    const text = options[key];
    if (text === undefined) {
      out[key] = spec.default;
      continue;
    }
    try {
      out[key] = parseValue(spec, text);
    } catch (err) {
      throw new OptionError(`${device}: ${key}=${text}: ${(err as Error).message}`);
    }
  }
  return out as OptionValues<S>;
}

/** One line per option for `vfio-user-ts devices`: `size  size, power of two, 4K..64G, default 256M  device memory`. */
export function describeOptions(schema: OptionSchema): string[] {
  const rows = Object.entries(schema).map(([key, spec]) => [key, describeSpec(spec), spec.description ?? ""] as const);
  const w0 = Math.max(0, ...rows.map((r) => r[0].length));
  const w1 = Math.max(0, ...rows.map((r) => r[1].length));
  return rows.map(([k, t, d]) => `${k.padEnd(w0)}  ${d ? `${t.padEnd(w1)}  ${d}` : t}`.trimEnd());
}

/** The type, range and default of one option, in words. */
export function describeSpec(spec: OptionSpec): string {
  const parts: string[] = [];
  switch (spec.type) {
    case "integer":
      parts.push("integer", range(spec.min, spec.max, String));
      break;
    case "bigint":
      parts.push("integer (64-bit)", range(spec.min, spec.max, hex));
      break;
    case "size":
      parts.push("size", spec.powerOfTwo ? "power of two" : "", range(spec.min, spec.max, formatSize));
      break;
    case "boolean":
      parts.push("boolean");
      break;
    case "string":
      parts.push(spec.choices ? `one of ${spec.choices.join("|")}` : "string");
      break;
  }
  if (spec.default !== undefined) {
    const d = spec.default;
    parts.push(`default ${typeof d === "bigint" ? (spec.type === "size" ? formatSize(d) : hex(d)) : String(d)}`);
  }
  return parts.filter((p) => p !== "").join(", ");
}

/**
 * Helpers for a device's saveState / loadState.
 *
 * `readState` reads a state object back with type checks: loadState must
 * refuse what it cannot load (the framework then keeps the device as it
 * was and fails the migration), and the error should name the field.
 *
 *     loadState(state: StateValue): void {
 *       const r = readState("counter", state);
 *       this.s = { count: r.u32("count"), address: r.u64("address"), busy: r.bool("busy") };
 *       r.end(); // refuses fields nobody read
 *     }
 *
 * `stateDifference` compares two states the way migration sees them
 * (after a msgpack round trip) and says where they first differ.
 */
import { Packr } from "msgpackr";
import type { StateValue } from "./api.ts";

const U32_MAX = 0xffff_ffff;
const U64_MAX = (1n << 64n) - 1n;

/** The msgpack settings of the migration stream (state-stream.ts): no records, 64-bit integers as bigint. */
const packr = new Packr({ useRecords: false, int64AsType: "bigint" });

/** Encodes a state as the migration stream does. */
export function packState(state: StateValue): Uint8Array {
  return packr.pack(state);
}

/** Decodes what packState produced. */
export function unpackState(bytes: Uint8Array): StateValue {
  return packr.unpack(bytes);
}

/** A state as a destination receives it: through msgpack and back. */
export function normalizeState(state: StateValue): StateValue {
  return unpackState(packState(state));
}

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v) && !(v instanceof Uint8Array) && !(v instanceof Map);
}

/** Reads the fields of a saved state object, each with a type check. */
export class StateReader {
  private readonly fields: Record<string, unknown>;
  private readonly read = new Set<string>();

  constructor(
    /** Used in error messages ("counter: state field ..."). */
    readonly device: string,
    state: StateValue,
  ) {
    if (!isPlainObject(state)) throw new Error(`${device}: state is not an object`);
    this.fields = state;
  }

  /** The raw value of a field that must be present. */
  value(key: string): unknown {
    this.read.add(key);
    if (!Object.hasOwn(this.fields, key)) throw this.error(key, "is missing");
    return this.fields[key];
  }

  /** An unsigned 32-bit integer; with `mask`, bits outside it are refused. */
  u32(key: string, mask = U32_MAX): number {
    const v = this.value(key);
    if (typeof v !== "number" || !Number.isInteger(v) || v < 0 || v > U32_MAX) throw this.error(key, "is not a u32");
    if ((v & ~mask) !== 0) throw this.error(key, `has bits outside 0x${mask.toString(16)}: 0x${v.toString(16)}`);
    return v;
  }

  /** An unsigned 64-bit integer (msgpack may deliver a small one as a number). */
  u64(key: string): bigint {
    const v = this.value(key);
    if (typeof v === "bigint" && v >= 0n && v <= U64_MAX) return v;
    if (typeof v === "number" && Number.isSafeInteger(v) && v >= 0) return BigInt(v);
    throw this.error(key, "is not a u64");
  }

  /** An integer in [min, max]. */
  int(key: string, min: number, max: number): number {
    const v = this.value(key);
    if (typeof v !== "number" || !Number.isInteger(v) || v < min || v > max) throw this.error(key, `is not an integer in [${min}, ${max}]`);
    return v;
  }

  bool(key: string): boolean {
    const v = this.value(key);
    if (typeof v !== "boolean") throw this.error(key, "is not a boolean");
    return v;
  }

  string(key: string): string {
    const v = this.value(key);
    if (typeof v !== "string") throw this.error(key, "is not a string");
    return v;
  }

  /** A copy of a byte array field; with `length`, any other length is refused. */
  bytes(key: string, length?: number): Uint8Array {
    const v = this.value(key);
    if (!(v instanceof Uint8Array)) throw this.error(key, "is not a byte array");
    if (length !== undefined && v.length !== length) throw this.error(key, `is ${v.length} bytes, expected ${length}`);
    return Uint8Array.from(v);
  }

  /** A nested object, read with its own reader. */
  object(key: string): StateReader {
    const v = this.value(key);
    if (!isPlainObject(v)) throw this.error(key, "is not an object");
    return new StateReader(`${this.device}: ${key}`, v);
  }

  /** Throws if the state has fields that were not read (a newer layout, or a mistake). */
  end(): void {
    const extra = Object.keys(this.fields).filter((k) => !this.read.has(k));
    if (extra.length > 0) throw new Error(`${this.device}: unknown state field${extra.length > 1 ? "s" : ""} ${extra.map((k) => `"${k}"`).join(", ")}`);
  }

  private error(key: string, what: string): Error {
    return new Error(`${this.device}: state field "${key}" ${what}`);
  }
}

/** Starts reading `state` (which must be an object) for device `device`. */
export function readState(device: string, state: StateValue): StateReader {
  return new StateReader(device, state);
}

function describe(v: unknown): string {
  if (v instanceof Uint8Array) return `${v.length} bytes`;
  if (typeof v === "bigint") return `${v}n`;
  if (typeof v === "string") return JSON.stringify(v.length > 40 ? `${v.slice(0, 40)}...` : v);
  if (Array.isArray(v)) return `array of ${v.length}`;
  if (v instanceof Map) return `map of ${v.size}`;
  if (typeof v === "object" && v !== null) return "object";
  return String(v);
}

function diff(a: unknown, b: unknown, path: string): string | null {
  const at = path === "" ? "(top)" : path;
  if (a instanceof Uint8Array || b instanceof Uint8Array) {
    if (!(a instanceof Uint8Array && b instanceof Uint8Array)) return `${at}: ${describe(a)} vs ${describe(b)}`;
    if (a.length !== b.length) return `${at}: ${a.length} bytes vs ${b.length} bytes`;
    for (let i = 0; i < a.length; i++) {
      if (a[i] !== b[i]) return `${at}: bytes differ first at index ${i} (0x${a[i]!.toString(16)} vs 0x${b[i]!.toString(16)})`;
    }
    return null;
  }
  if (Array.isArray(a) || Array.isArray(b)) {
    if (!(Array.isArray(a) && Array.isArray(b))) return `${at}: ${describe(a)} vs ${describe(b)}`;
    if (a.length !== b.length) return `${at}: array of ${a.length} vs array of ${b.length}`;
    for (let i = 0; i < a.length; i++) {
      const d = diff(a[i], b[i], `${path}[${i}]`);
      if (d) return d;
    }
    return null;
  }
  if (a instanceof Map || b instanceof Map) {
    if (!(a instanceof Map && b instanceof Map)) return `${at}: ${describe(a)} vs ${describe(b)}`;
    if (a.size !== b.size) return `${at}: map of ${a.size} vs map of ${b.size}`;
    for (const [k, v] of a) {
      if (!b.has(k)) return `${at}: key ${String(k)} only on the left`;
      const d = diff(v, b.get(k), `${path}.get(${String(k)})`);
      if (d) return d;
    }
    return null;
  }
  if (typeof a === "object" && a !== null && typeof b === "object" && b !== null) {
    const ka = Object.keys(a).sort();
    const kb = Object.keys(b).sort();
    for (const k of ka) if (!Object.hasOwn(b, k)) return `${path === "" ? "" : `${path}.`}${k}: ${describe((a as Record<string, unknown>)[k])} vs (missing)`;
    for (const k of kb) if (!Object.hasOwn(a, k)) return `${path === "" ? "" : `${path}.`}${k}: (missing) vs ${describe((b as Record<string, unknown>)[k])}`;
    for (const k of ka) {
      const d = diff((a as Record<string, unknown>)[k], (b as Record<string, unknown>)[k], path === "" ? k : `${path}.${k}`);
      if (d) return d;
    }
    return null;
  }
  if (typeof a !== typeof b) return `${at}: ${describe(a)} (${typeof a}) vs ${describe(b)} (${typeof b})`;
  if (Object.is(a, b) || a === b) return null;
  return `${at}: ${describe(a)} vs ${describe(b)}`;
}

/**
 * Where two states differ, or null when they are equal. Both are compared
 * as a migration destination would receive them (through msgpack), so a
 * Buffer equals a Uint8Array with the same bytes; a number and a bigint of
 * the same value are different.
 */
export function stateDifference(a: StateValue, b: StateValue): string | null {
  return diff(normalizeState(a), normalizeState(b), "");
}

/** True when `stateDifference` finds nothing. */
export function statesEqual(a: StateValue, b: StateValue): boolean {
  return stateDifference(a, b) === null;
}

/**
 * The fault language of `serve --fault SPEC` (docs/faults.md): one fault per
 * spec, a comma-separated list of `key=value` items (or bare keys):
 *
 *   trigger   arc=FROM>TO | cmd=COMMAND | feature=FEATURE | after=N | state=STATE | irq=INDEX[:VECTOR]
 *   action    errno=E | error | delay=MS | drop | short=BYTES | corrupt[=OFFSET]
 *             | size=BYTES | initial=BYTES | dirty=BYTES | stall=MS|forever
 *   when      nth=N (default 1) | times=K|all (default 1) | in=STATE
 *
 * Parsing is pure and total: a spec either becomes a Fault or a
 * FaultSyntaxError naming the 1-based column of the item at fault.
 */
import { COMMAND_NAMES, Command, Errno, Feature, IrqIndex, MIG_STATE_NAMES, MigState } from "../../protocol/constants.ts";
import { ALL_FEATURE_SETS, isArc } from "../migration/fsm.ts";

export type FaultTrigger =
  | { kind: "arc"; from: MigState; to: MigState }
  | { kind: "cmd"; command: number }
  | { kind: "feature"; feature: number }
  | { kind: "after"; messages: number }
  | { kind: "state"; state: MigState }
  | { kind: "irq"; index: number; vector: number | null };

export type FaultAction =
  | { kind: "errno"; errno: number }
  | { kind: "error"; errno: number }
  | { kind: "delay"; ms: number }
  | { kind: "drop" }
  | { kind: "short"; bytes: number }
  | { kind: "corrupt"; offset: number }
  | { kind: "size"; bytes: bigint }
  | { kind: "precopy"; initial: bigint | null; dirty: bigint | null }
  | { kind: "stall"; ms: number | null };

export interface Fault {
  /** The spec as given, for log lines. */
  source: string;
  trigger: FaultTrigger;
  action: FaultAction;
  /** Fires first at the nth matching event (1-based). */
  nth: number;
  /** Fires at this many consecutive matching events from the nth; null: every one. */
  times: number | null;
  /** cmd, feature, irq: match only while the device is in this migration state. */
  in: MigState | null;
}

export class FaultSyntaxError extends Error {
  override readonly name = "FaultSyntaxError";
  constructor(
    /** 1-based column in the spec of the item (or value) at fault. */
    readonly column: number,
    readonly reason: string,
    readonly spec: string,
  ) {
    super(`column ${column}: ${reason}`);
  }
}

/** Longest delay or stall accepted, ms (ten minutes: longer is a hang, which `stall=forever` says plainly). */
export const MAX_DELAY_MS = 600_000;

const TRIGGERS = ["arc", "cmd", "feature", "after", "state", "irq"] as const;
const ACTIONS = ["errno", "error", "delay", "drop", "short", "corrupt", "size", "initial", "dirty", "stall"] as const;
const MODIFIERS = ["nth", "times", "in"] as const;
type Key = (typeof TRIGGERS)[number] | (typeof ACTIONS)[number] | (typeof MODIFIERS)[number];
const KEYS: readonly string[] = [...TRIGGERS, ...ACTIONS, ...MODIFIERS];
/** Keys written bare (`drop`), or with an optional value (`corrupt`, `corrupt=12`). */
const BARE: ReadonlySet<string> = new Set(["error", "drop", "corrupt"]);
const NEEDS_NO_VALUE: ReadonlySet<string> = new Set(["error", "drop"]);

/** Which actions each trigger takes (and for cmd/feature, which command-specific ones). */
const ACTIONS_FOR: Readonly<Record<FaultTrigger["kind"], readonly string[]>> = {
  arc: ["errno", "error", "delay"],
  cmd: ["errno", "delay", "drop"],
  feature: ["errno", "delay", "drop"],
  after: ["drop"],
  state: ["drop"],
  irq: ["stall"],
};
const CMD_ACTIONS: Readonly<Record<number, readonly string[]>> = {
  [Command.MIG_DATA_READ]: ["short", "corrupt"],
  [Command.MIG_GET_PRECOPY_INFO]: ["initial", "dirty"],
};
const FEATURE_ACTIONS: Readonly<Record<number, readonly string[]>> = {
  [Feature.MIG_DATA_SIZE]: ["size"],
};

/** The features DEVICE_FEATURE serves, by name. */
const FEATURE_NAMES: Readonly<Record<string, number>> = {
  MIGRATION: Feature.MIGRATION,
  MIG_DEVICE_STATE: Feature.MIG_DEVICE_STATE,
  DMA_LOGGING_START: Feature.DMA_LOGGING_START,
  DMA_LOGGING_STOP: Feature.DMA_LOGGING_STOP,
  DMA_LOGGING_REPORT: Feature.DMA_LOGGING_REPORT,
  MIG_DATA_SIZE: Feature.MIG_DATA_SIZE,
};

const IRQ_NAMES: Readonly<Record<string, number>> = { INTX: IrqIndex.INTX, MSI: IrqIndex.MSI, MSIX: IrqIndex.MSIX };

interface Item {
  key: string;
  value: string | null;
  /** Columns (1-based) of the key and of the value. */
  at: number;
  valueAt: number;
}

function splitItems(spec: string): Item[] {
  const items: Item[] = [];
  let start = 0;
  for (;;) {
    const comma = spec.indexOf(",", start);
    const end = comma < 0 ? spec.length : comma;
    const text = spec.slice(start, end);
    const at = start + 1;
    if (text === "") throw new FaultSyntaxError(at, comma < 0 && start > 0 ? "a trailing ','" : "an empty item", spec);
    if (/\s/.test(text)) throw new FaultSyntaxError(at + text.search(/\s/), "white space in a fault spec", spec);
    const eq = text.indexOf("=");
    if (eq === 0) throw new FaultSyntaxError(at, `'${text}' has no key before '='`, spec);
    items.push(eq < 0 ? { key: text, value: null, at, valueAt: at + text.length } : { key: text.slice(0, eq), value: text.slice(eq + 1), at, valueAt: at + eq + 1 });
    if (comma < 0) return items;
    start = comma + 1;
  }
}

/** Parses one fault spec; throws FaultSyntaxError with the column at fault. */
export function parseFault(spec: string): Fault {
  if (spec === "") throw new FaultSyntaxError(1, "an empty fault spec", spec);
  const err = (column: number, reason: string) => new FaultSyntaxError(column, reason, spec);
  const seen = new Map<string, Item>();
  for (const item of splitItems(spec)) {
    if (!KEYS.includes(item.key)) throw err(item.at, `unknown key '${item.key}' (keys: ${KEYS.join(", ")})`);
    if (seen.has(item.key)) throw err(item.at, `'${item.key}' given twice`);
    if (item.value === null && !BARE.has(item.key)) throw err(item.at, `'${item.key}' needs a value ('${item.key}=...')`);
    if (item.value !== null && NEEDS_NO_VALUE.has(item.key)) throw err(item.valueAt, `'${item.key}' takes no value`);
    if (item.value === "") throw err(item.valueAt, `'${item.key}=' has an empty value`);
    seen.set(item.key, item);
  }
  const get = (k: Key) => seen.get(k);

  // trigger: exactly one
  // in the order they were written, so an error points at the second one given
  const byColumn = (keys: readonly string[]) => keys.filter((k) => seen.has(k)).sort((x, y) => seen.get(x)!.at - seen.get(y)!.at);
  const triggers = byColumn(TRIGGERS) as (typeof TRIGGERS)[number][];
  if (triggers.length === 0) throw err(1, `no trigger: give one of ${TRIGGERS.map((t) => `${t}=`).join(", ")}`);
  if (triggers.length > 1) throw err(get(triggers[1]!)!.at, `two triggers ('${triggers[0]}' and '${triggers[1]}'); a fault has one`);
  const tItem = get(triggers[0]!)!;
  const trigger = parseTrigger(triggers[0]!, tItem, err);

  // action: exactly one (error may name its errno; initial and dirty go together)
  const actionKeys = byColumn(ACTIONS);
  const allowed = [...ACTIONS_FOR[trigger.kind], ...(trigger.kind === "cmd" ? (CMD_ACTIONS[trigger.command] ?? []) : []), ...(trigger.kind === "feature" ? (FEATURE_ACTIONS[trigger.feature] ?? []) : [])];
  if (actionKeys.length === 0) throw err(spec.length + 1, `no action for ${describeTrigger(trigger)}: give one of ${allowed.join(", ")}`);
  for (const k of actionKeys) {
    if (!allowed.includes(k)) throw err(get(k as Key)!.at, `'${k}' is not an action of ${describeTrigger(trigger)} (its actions: ${allowed.join(", ")})`);
  }
  const together = (a: string[]) => actionKeys.every((k) => a.includes(k));
  if (actionKeys.length > 1 && !together(["error", "errno"]) && !together(["initial", "dirty"])) {
    throw err(get(actionKeys[1]! as Key)!.at, `two actions ('${actionKeys[0]}' and '${actionKeys[1]}'); a fault has one`);
  }
  const action = parseAction(actionKeys, get, err);

  // when
  const nthItem = get("nth");
  const nth = nthItem ? parseCount(nthItem, 1, 1_000_000_000, err) : 1;
  const timesItem = get("times");
  const times = timesItem ? (timesItem.value === "all" ? null : parseCount(timesItem, 1, 1_000_000_000, err)) : 1;
  const inItem = get("in");
  let inState: MigState | null = null;
  if (inItem) {
    if (trigger.kind !== "cmd" && trigger.kind !== "feature" && trigger.kind !== "irq") {
      throw err(inItem.at, `'in' filters cmd, feature and irq triggers, not ${triggers[0]}`);
    }
    inState = parseState(inItem, err);
  }
  return { source: spec, trigger, action, nth, times, in: inState };
}

type ErrFn = (column: number, reason: string) => FaultSyntaxError;

function describeTrigger(t: FaultTrigger): string {
  switch (t.kind) {
    case "arc":
      return `arc=${MIG_STATE_NAMES[t.from]}>${MIG_STATE_NAMES[t.to]}`;
    case "cmd":
      return `cmd=${COMMAND_NAMES[t.command] ?? t.command}`;
    case "feature":
      return `feature=${Object.keys(FEATURE_NAMES).find((k) => FEATURE_NAMES[k] === t.feature)}`;
    case "after":
      return `after=${t.messages}`;
    case "state":
      return `state=${MIG_STATE_NAMES[t.state]}`;
    case "irq":
      return `irq=${Object.keys(IRQ_NAMES).find((k) => IRQ_NAMES[k] === t.index)}${t.vector === null ? "" : `:${t.vector}`}`;
  }
}

function parseTrigger(kind: (typeof TRIGGERS)[number], item: Item, err: ErrFn): FaultTrigger {
  const v = item.value!;
  switch (kind) {
    case "arc": {
      const gt = v.indexOf(">");
      if (gt < 0) throw err(item.valueAt, `arc needs FROM>TO, got '${v}'`);
      const from = stateByName(v.slice(0, gt), item.valueAt, err);
      const to = stateByName(v.slice(gt + 1), item.valueAt + gt + 1, err);
      // an arc of the kernel's FSM under some combination of optional states
      if (!ALL_FEATURE_SETS.some((f) => isArc(from, to, f))) {
        throw err(item.valueAt, `${MIG_STATE_NAMES[from]}>${MIG_STATE_NAMES[to]} is not an arc of the migration state machine (one hop: e.g. PRE_COPY>STOP_COPY, STOP_COPY>STOP, RESUMING>STOP)`);
      }
      return { kind, from, to };
    }
    case "cmd": {
      const upper = v.toUpperCase();
      const byName = Object.entries(COMMAND_NAMES).find(([, name]) => name === upper);
      const command = byName ? Number(byName[0]) : /^\d+$/.test(v) && COMMAND_NAMES[Number(v)] !== undefined ? Number(v) : undefined;
      if (command === undefined) throw err(item.valueAt, `unknown command '${v}' (commands: ${Object.values(COMMAND_NAMES).join(", ")})`);
      if (command === Command.DMA_READ || command === Command.DMA_WRITE) throw err(item.valueAt, `${COMMAND_NAMES[command]} goes from the server to the client; a fault acts on client commands`);
      return { kind, command };
    }
    case "feature": {
      const feature = FEATURE_NAMES[v.toUpperCase()];
      if (feature === undefined) throw err(item.valueAt, `unknown feature '${v}' (features: ${Object.keys(FEATURE_NAMES).join(", ")})`);
      return { kind, feature };
    }
    case "after":
      return { kind, messages: parseCount(item, 0, 1_000_000_000, err) };
    case "state":
      return { kind, state: parseState(item, err) };
    case "irq": {
      const colon = v.indexOf(":");
      const name = (colon < 0 ? v : v.slice(0, colon)).toUpperCase();
      const index = IRQ_NAMES[name];
      if (index === undefined) throw err(item.valueAt, `unknown interrupt '${colon < 0 ? v : v.slice(0, colon)}' (INTX, MSI, MSIX, optionally :VECTOR)`);
      if (colon < 0) return { kind, index, vector: null };
      const vec = v.slice(colon + 1);
      if (!/^\d+$/.test(vec) || Number(vec) > 2047) throw err(item.valueAt + colon + 1, `vector must be an integer in [0, 2047], got '${vec}'`);
      if (index === IrqIndex.INTX && Number(vec) !== 0) throw err(item.valueAt + colon + 1, "INTx has one vector, 0");
      return { kind, index, vector: Number(vec) };
    }
  }
}

function stateByName(name: string, column: number, err: ErrFn): MigState {
  const upper = name.toUpperCase();
  const entry = Object.entries(MigState).find(([n]) => n === upper);
  if (!entry) throw err(column, `unknown migration state '${name}' (states: ${Object.keys(MigState).join(", ")})`);
  return entry[1];
}

function parseState(item: Item, err: ErrFn): MigState {
  return stateByName(item.value!, item.valueAt, err);
}

function parseAction(keys: readonly string[], get: (k: Key) => Item | undefined, err: ErrFn): FaultAction {
  if (keys.includes("error")) {
    const e = get("errno");
    return { kind: "error", errno: e ? parseErrno(e, err) : Errno.EIO };
  }
  if (keys.includes("initial") || keys.includes("dirty")) {
    const i = get("initial");
    const d = get("dirty");
    return { kind: "precopy", initial: i ? parseBytes(i, err) : null, dirty: d ? parseBytes(d, err) : null };
  }
  const k = keys[0]!;
  const item = get(k as Key)!;
  switch (k) {
    case "errno":
      return { kind: "errno", errno: parseErrno(item, err) };
    case "delay":
      return { kind: "delay", ms: parseCount(item, 0, MAX_DELAY_MS, err) };
    case "drop":
      return { kind: "drop" };
    case "short": {
      const bytes = parseBytes(item, err);
      if (bytes >= 1n << 32n) throw err(item.valueAt, `short=${item.value} does not fit a u32 size`);
      return { kind: "short", bytes: Number(bytes) };
    }
    case "corrupt":
      return { kind: "corrupt", offset: item.value === null ? 0 : parseCount(item, 0, 0xffff_ffff, err) };
    case "size":
      return { kind: "size", bytes: parseBytes(item, err) };
    case "stall":
      return { kind: "stall", ms: item.value === "forever" ? null : parseCount(item, 0, MAX_DELAY_MS, err) };
  }
  throw err(item.at, `unhandled action '${k}'`);
}

function parseErrno(item: Item, err: ErrFn): number {
  const v = item.value!;
  const named = (Errno as Record<string, number>)[v.toUpperCase()];
  if (named !== undefined) return named;
  if (/^\d+$/.test(v) && Number(v) >= 1 && Number(v) <= 4095) return Number(v);
  throw err(item.valueAt, `errno must be a name (${Object.keys(Errno).join(", ")}) or a number in [1, 4095], got '${v}'`);
}

/** A decimal or 0x integer in [min, max]. */
function parseCount(item: Item, min: number, max: number, err: ErrFn): number {
  const v = item.value!;
  if (!/^(\d+|0x[0-9a-fA-F]+)$/.test(v)) throw err(item.valueAt, `${item.key} must be an integer, got '${v}'`);
  const n = Number(v);
  if (!Number.isSafeInteger(n) || n < min || n > max) throw err(item.valueAt, `${item.key} must be in [${min}, ${max}], got ${v}`);
  return n;
}

const UNITS: Readonly<Record<string, bigint>> = { "": 1n, K: 1n << 10n, M: 1n << 20n, G: 1n << 30n, T: 1n << 40n };

/** Bytes: a decimal or 0x integer, decimal with a K/M/G/T suffix (binary); at most 2^64 - 1. */
function parseBytes(item: Item, err: ErrFn): bigint {
  const v = item.value!;
  const m = /^(?:(0x[0-9a-fA-F]+)|(\d+)([KMGT]?))$/i.exec(v);
  if (!m) throw err(item.valueAt, `${item.key} must be a byte count (e.g. 4096, 0x1000, 64K, 1G), got '${v}'`);
  const n = m[1] !== undefined ? BigInt(m[1]) : BigInt(m[2]!) * UNITS[(m[3] ?? "").toUpperCase()]!;
  if (n >= 1n << 64n) throw err(item.valueAt, `${item.key}=${v} does not fit 64 bits`);
  return n;
}

/**
 * The VFIO migration v2 device-state machine, as data.
 *
 * Sources (Linux): include/uapi/linux/vfio.h, the comment block above
 * `enum vfio_device_mig_state`, and drivers/vfio/vfio_main.c,
 * `vfio_mig_get_next_state`. The kernel is the authority; this file restates
 * its rules as tables:
 *
 * - `ARCS`: the single-step arcs a device implements, each tagged with the
 *   feature combination under which it exists.
 * - `NEXT_HOP`: for every (current, requested) pair with every optional state
 *   supported, the state to step to next. Devices without P2P or PRE_COPY use
 *   the same table with the kernel's skip rule (see `nextHop`).
 * - `STATE_RULES`: what each state permits (data read/write, DMA, ...).
 *
 * `MigrationFsm` walks a request one hop at a time, calling the device for
 * each hop, and is bounded. The unit test re-derives `NEXT_HOP` by
 * breadth-first search over `ARCS` and compares every entry.
 */
import { MIG_STATE_COUNT, MIG_STATE_NAMES, MigState, MigrationFlags } from "../../protocol/constants.ts";
import { VfioUserError, fail } from "../../protocol/errors.ts";

/** Optional migration states the device supports (VFIO_MIGRATION_P2P / _PRE_COPY). */
export interface MigrationFeatures {
  /** RUNNING_P2P (and PRE_COPY_P2P together with preCopy). */
  readonly p2p: boolean;
  /** PRE_COPY (and PRE_COPY_P2P together with p2p). */
  readonly preCopy: boolean;
}

/** The four feature combinations, for tests and tables. */
export const ALL_FEATURE_SETS: readonly MigrationFeatures[] = [
  { p2p: false, preCopy: false },
  { p2p: true, preCopy: false },
  { p2p: false, preCopy: true },
  { p2p: true, preCopy: true },
];

/** Longest walk the walker accepts; the real table needs at most 4 hops. */
export const MAX_HOPS = MIG_STATE_COUNT;

export function isMigState(value: number): value is MigState {
  return Number.isInteger(value) && value >= 0 && value < MIG_STATE_COUNT;
}

export function migStateName(state: number): string {
  return MIG_STATE_NAMES[state] ?? `state ${state}`;
}

/**
 * Features from VFIO_DEVICE_FEATURE_MIGRATION flags. spec (vfio.h): "at least
 * VFIO_MIGRATION_STOP_COPY must be set"; other bits are reserved.
 */
export function featuresFromFlags(flags: bigint): MigrationFeatures {
  const known = MigrationFlags.STOP_COPY | MigrationFlags.P2P | MigrationFlags.PRE_COPY;
  if ((flags & MigrationFlags.STOP_COPY) === 0n) throw fail.inval("migration flags lack STOP_COPY");
  if ((flags & ~known) !== 0n) throw fail.inval(`unknown migration flags 0x${flags.toString(16)}`);
  return { p2p: (flags & MigrationFlags.P2P) !== 0n, preCopy: (flags & MigrationFlags.PRE_COPY) !== 0n };
}

export function featuresToFlags(features: MigrationFeatures): bigint {
  let flags = MigrationFlags.STOP_COPY;
  if (features.p2p) flags |= MigrationFlags.P2P;
  if (features.preCopy) flags |= MigrationFlags.PRE_COPY;
  return flags;
}

/**
 * Whether the device can be in `state`. ERROR is never a state one can ask
 * for (spec: "ERROR cannot be specified as a device state"), so it counts as
 * unsupported here; the walker handles "currently in ERROR" on its own.
 */
export function isSupported(state: number, features: MigrationFeatures): boolean {
  switch (state) {
    case MigState.STOP:
    case MigState.RUNNING:
    case MigState.STOP_COPY:
    case MigState.RESUMING:
      return true;
    case MigState.RUNNING_P2P:
      return features.p2p;
    case MigState.PRE_COPY:
      return features.preCopy;
    case MigState.PRE_COPY_P2P:
      return features.p2p && features.preCopy;
    default:
      return false;
  }
}

// ---------------------------------------------------------------------------
// Arcs
// ---------------------------------------------------------------------------

/** Feature combination under which an arc exists. */
export type ArcCondition = "always" | "p2p" | "noP2p" | "preCopy" | "preCopyNoP2p" | "preCopyP2p";

const CONDITION: Readonly<Record<ArcCondition, (f: MigrationFeatures) => boolean>> = {
  always: () => true,
  p2p: (f) => f.p2p,
  noP2p: (f) => !f.p2p,
  preCopy: (f) => f.preCopy,
  preCopyNoP2p: (f) => f.preCopy && !f.p2p,
  preCopyP2p: (f) => f.preCopy && f.p2p,
};

export type Arc = readonly [from: MigState, to: MigState, when: ArcCondition];

const {
  ERROR: E,
  STOP: S,
  RUNNING: R,
  STOP_COPY: SC,
  RESUMING: RS,
  RUNNING_P2P: RP,
  PRE_COPY: PC,
  PRE_COPY_P2P: PP,
} = MigState;

/**
 * Single-step arcs a device implements (spec: the arc list in the comment of
 * `vfio_mig_get_next_state`). With P2P, RUNNING and STOP are not adjacent:
 * the path passes RUNNING_P2P. With P2P and PRE_COPY, PRE_COPY reaches
 * STOP_COPY through PRE_COPY_P2P.
 */
export const ARCS: readonly Arc[] = [
  // spec: "requires the driver to implement" (STOP_COPY, always present)
  [RS, S, "always"],
  [S, RS, "always"],
  [S, SC, "always"],
  [SC, S, "always"],
  // spec: "If P2P is supported then the driver must also implement"
  [R, RP, "p2p"],
  [RP, R, "p2p"],
  [RP, S, "p2p"],
  [S, RP, "p2p"],
  // spec: "If precopy is supported then the driver must support"
  [R, PC, "preCopy"],
  [PC, R, "preCopy"],
  [PC, SC, "preCopyNoP2p"],
  // spec: "if precopy and P2P are supported together ... additional arcs"
  [PC, PP, "preCopyP2p"],
  [PP, PC, "preCopyP2p"],
  [PP, RP, "preCopyP2p"],
  [PP, SC, "preCopyP2p"],
  [RP, PP, "preCopyP2p"],
  // spec: "Without P2P and precopy the driver must implement" (and without
  // P2P alone: the kernel's skip of RUNNING_P2P yields the same arcs)
  [R, S, "noP2p"],
  [S, R, "noP2p"],
];

/** The arcs that exist for one feature combination, as [from, to] pairs. */
export function arcsFor(features: MigrationFeatures): Array<readonly [MigState, MigState]> {
  return ARCS.filter(([, , when]) => CONDITION[when](features)).map(([from, to]) => [from, to] as const);
}

export function isArc(from: MigState, to: MigState, features: MigrationFeatures): boolean {
  return ARCS.some(([f, t, when]) => f === from && t === to && CONDITION[when](features));
}

// ---------------------------------------------------------------------------
// Next hop
// ---------------------------------------------------------------------------

/**
 * NEXT_HOP[current][requested] with P2P and PRE_COPY both supported; ERROR
 * where the request is refused. Rows and columns follow the enum order:
 * ERROR, STOP, RUNNING, STOP_COPY, RESUMING, RUNNING_P2P, PRE_COPY,
 * PRE_COPY_P2P.
 *
 * spec (vfio.h): "Select the shortest path. The path cannot have saving group
 * states as interior arcs, only starting/end states." A walk that starts and
 * ends in the saving group stays inside it (PRE_COPY -> PRE_COPY_P2P ->
 * STOP_COPY keeps the data session open). "STOP_COPY -> PRE_COPY,
 * STOP_COPY -> PRE_COPY_P2P: These arcs are not permitted". Nothing leads out
 * of ERROR but DEVICE_RESET, and ERROR is never a valid request.
 */
// prettier-ignore
export const NEXT_HOP: ReadonlyArray<ReadonlyArray<MigState>> = [
  //                 ERROR STOP RUNNING STOP_COPY RESUMING RUNNING_P2P PRE_COPY PRE_COPY_P2P
  /* ERROR        */ [E,   E,   E,      E,        E,       E,          E,       E ],
  /* STOP         */ [E,   S,   RP,     SC,       RS,      RP,         RP,      RP],
  /* RUNNING      */ [E,   RP,  R,      RP,       RP,      RP,         PC,      RP],
  /* STOP_COPY    */ [E,   S,   S,      SC,       S,       S,          E,       E ],
  /* RESUMING     */ [E,   S,   S,      S,        RS,      S,          S,       S ],
  /* RUNNING_P2P  */ [E,   S,   R,      S,        S,       RP,         R,       PP],
  /* PRE_COPY     */ [E,   R,   R,      PP,       R,       R,          PC,      PP],
  /* PRE_COPY_P2P */ [E,   RP,  RP,     SC,       RP,      RP,         PC,      PP],
];

export type NextHopFn = (from: MigState, to: MigState, features: MigrationFeatures) => MigState;

/**
 * The state to step to from `from` on the way to `to`, or ERROR when the
 * request is refused (either state unsupported, ERROR as target, anything
 * from ERROR, STOP_COPY -> PRE_COPY*). `nextHop(s, s)` is `s`.
 *
 * Devices lacking an optional state: spec (vfio_main.c) "Arcs touching
 * optional and unsupported states are skipped over. The driver will instead
 * see an arc from the original state to the next logical state": while the
 * table's answer is unsupported, look up that state's row for the same target.
 */
export function nextHop(from: MigState, to: MigState, features: MigrationFeatures): MigState {
  if (!isMigState(from) || !isMigState(to)) return E;
  if (!isSupported(from, features) || !isSupported(to, features)) return E;
  let next = NEXT_HOP[from]![to]!;
  // Bounded: each skip moves to another row; more than MIG_STATE_COUNT skips
  // would mean the table has a cycle.
  for (let skips = 0; next !== E && !isSupported(next, features); skips++) {
    if (skips >= MIG_STATE_COUNT) return E;
    next = NEXT_HOP[next]![to]!;
  }
  return next;
}

/** True when `to` may be requested from `from` (including `from === to`). */
export function isValidRequest(from: MigState, to: MigState, features: MigrationFeatures): boolean {
  return nextHop(from, to, features) !== E;
}

/**
 * The states visited on the way from `from` to `to`, excluding `from` and
 * ending with `to`; empty when `from === to`. Throws EINVAL for a refused
 * request, EIO when the table misbehaves (ERROR mid-walk, or longer than
 * MAX_HOPS).
 */
export function pathTo(
  from: MigState,
  to: MigState,
  features: MigrationFeatures,
  hop: NextHopFn = nextHop,
): MigState[] {
  if (hop(from, to, features) === E) throw refused(from, to);
  const path: MigState[] = [];
  let cur = from;
  while (cur !== to) {
    if (path.length >= MAX_HOPS) throw fail.io(`migration walk ${migStateName(from)} -> ${migStateName(to)} exceeds ${MAX_HOPS} hops`);
    const next = hop(cur, to, features);
    if (next === E) throw fail.io(`migration walk ${migStateName(from)} -> ${migStateName(to)} hit ERROR at ${migStateName(cur)}`);
    path.push(next);
    cur = next;
  }
  return path;
}

function refused(from: number, to: number): VfioUserError {
  return fail.inval(`migration state change ${migStateName(from)} -> ${migStateName(to)} is not allowed`).with({ rule: "mig-state-arc" });
}

/**
 * A hop handler that throws this refuses the arc without harm: the device
 * stays in the state the hop started from, not ERROR. vfio.h allows it: on a
 * failed SET, device_state is "the current state the device is in. This may
 * be the original operating state or some other state along the combination
 * transition path."
 */
export class ArcRefused extends VfioUserError {}

// ---------------------------------------------------------------------------
// Walker
// ---------------------------------------------------------------------------

/** Called for each single-step arc; the device performs the arc here. */
export type HopHandler = (from: MigState, to: MigState) => void | Promise<void>;

export interface MigrationFsmOptions {
  /** Substitute next-hop function (tests use it to inject a broken table). */
  readonly nextHop?: NextHopFn;
}

/**
 * The device state of one device. `transition` walks a request one arc at a
 * time; the state changes only after the device's hop handler returned.
 */
export class MigrationFsm {
  readonly features: MigrationFeatures;
  #state: MigState;
  #hop: NextHopFn;
  #busy = false;
  /** Bumped by reset() so a walk interrupted by a reset does not write state. */
  #generation = 0;

  constructor(features: MigrationFeatures, initial: MigState = MigState.RUNNING, options: MigrationFsmOptions = {}) {
    if (!isSupported(initial, features)) throw fail.inval(`initial migration state ${migStateName(initial)} is not supported`);
    this.features = { p2p: features.p2p, preCopy: features.preCopy };
    this.#state = initial;
    this.#hop = options.nextHop ?? nextHop;
  }

  get state(): MigState {
    return this.#state;
  }

  /** True while a transition is walking. */
  get busy(): boolean {
    return this.#busy;
  }

  /**
   * Move to `to`, one arc at a time, calling `onHop(from, next)` before each
   * step. A refused request throws EINVAL and leaves the state alone. A
   * handler that throws ArcRefused leaves the device where that hop began;
   * any other throw leaves the device in ERROR and the error is rethrown
   * (spec: "the device was unable to execute the requested arc and was also
   * unable to restore the device to any valid device_state"). A table that
   * misbehaves (ERROR mid-walk, more than MAX_HOPS) is a bug: ERROR + EIO.
   */
  async transition(to: MigState, onHop: HopHandler): Promise<void> {
    if (this.#busy) throw fail.busy("a migration state change is already in progress");
    const from = this.#state;
    if (from === E) throw fail.inval(`device is in ERROR; DEVICE_RESET is required before ${migStateName(to)}`).with({ rule: "mig-state-arc" });
    if (!isMigState(to) || this.#hop(from, to, this.features) === E) throw refused(from, to);

    this.#busy = true;
    const generation = this.#generation;
    try {
      let hops = 0;
      while (this.#state !== to) {
        const cur = this.#state;
        if (hops >= MAX_HOPS) {
          this.#state = E;
          throw fail.io(`migration walk ${migStateName(from)} -> ${migStateName(to)} exceeds ${MAX_HOPS} hops`);
        }
        const next = this.#hop(cur, to, this.features);
        if (next === E || !isMigState(next)) {
          this.#state = E;
          throw fail.io(`migration walk ${migStateName(from)} -> ${migStateName(to)} has no next hop from ${migStateName(cur)}`);
        }
        try {
          await onHop(cur, next);
        } catch (err) {
          if (generation === this.#generation && !(err instanceof ArcRefused)) this.#state = E;
          throw err;
        }
        if (generation !== this.#generation) {
          throw fail.io(`migration walk ${migStateName(from)} -> ${migStateName(to)} interrupted by device reset`);
        }
        this.#state = next;
        hops++;
      }
    } finally {
      if (generation === this.#generation) this.#busy = false;
    }
  }

  /** DEVICE_RESET: back to RUNNING from any state, ERROR included (spec: "To recover from ERROR VFIO_DEVICE_RESET must be used"). */
  reset(): void {
    this.#generation++;
    this.#busy = false;
    this.#state = MigState.RUNNING;
  }
}

// ---------------------------------------------------------------------------
// What each state permits
// ---------------------------------------------------------------------------

export interface StateRule {
  /** In the saving group (spec: "PRE_COPY, PRE_COPY_P2P and STOP_COPY form the saving group"). */
  readonly saving: boolean;
  /** MIG_DATA_READ is served. */
  readonly dataRead: boolean;
  /** MIG_DATA_WRITE is accepted. */
  readonly dataWrite: boolean;
  /** The device may initiate DMA. */
  readonly dma: boolean;
  /** The device may raise interrupts. */
  readonly interrupts: boolean;
  /** MIG_GET_PRECOPY_INFO is served. */
  readonly precopyInfo: boolean;
}

/**
 * DMA and interrupts, from vfio.h:
 * - RUNNING, PRE_COPY: "the device may generate interrupts, DMA"; PRE_COPY
 *   arcs "do not change the device operation".
 * - STOP, STOP_COPY, RESUMING: "must not generate interrupts, DMA, or any
 *   other change to external state".
 * - RUNNING_P2P, PRE_COPY_P2P: "must prevent the device from initiating any
 *   new P2P DMA transactions. If the device can identify P2P transactions then
 *   it can stop only P2P DMA, otherwise it must stop all DMA." An emulated
 *   device cannot tell whether a DMA address belongs to a peer device's BAR,
 *   so it stops all DMA. Interrupts are not restricted there; a vfio-user
 *   interrupt is an eventfd signal, not a DMA write, so they stay allowed.
 * - MIG_GET_PRECOPY_INFO: "valid only in PRE_COPY states".
 */
// prettier-ignore
export const STATE_RULES: Readonly<Record<MigState, StateRule>> = {
  //                        saving dataRead dataWrite dma    interrupts precopyInfo
  [E]:  rule(false, false, false, false, false, false),
  [S]:  rule(false, false, false, false, false, false),
  [R]:  rule(false, false, false, true,  true,  false),
  [SC]: rule(true,  true,  false, false, false, false),
  [RS]: rule(false, false, true,  false, false, false),
  [RP]: rule(false, false, false, false, true,  false),
  [PC]: rule(true,  true,  false, true,  true,  true ),
  [PP]: rule(true,  true,  false, false, true,  true ),
};

function rule(
  saving: boolean,
  dataRead: boolean,
  dataWrite: boolean,
  dma: boolean,
  interrupts: boolean,
  precopyInfo: boolean,
): StateRule {
  return Object.freeze({ saving, dataRead, dataWrite, dma, interrupts, precopyInfo });
}

function ruleOf(state: MigState): StateRule {
  return STATE_RULES[state] ?? STATE_RULES[E];
}

/** STOP_COPY, PRE_COPY, PRE_COPY_P2P. */
export function isSaving(state: MigState): boolean {
  return ruleOf(state).saving;
}

/** MIG_DATA_READ is legal: PRE_COPY, PRE_COPY_P2P, STOP_COPY. */
export function allowsDataRead(state: MigState): boolean {
  return ruleOf(state).dataRead;
}

/** MIG_DATA_WRITE is legal: RESUMING. */
export function allowsDataWrite(state: MigState): boolean {
  return ruleOf(state).dataWrite;
}

/** The device may initiate DMA: RUNNING, PRE_COPY (all DMA stops in the P2P states). */
export function deviceMayDma(state: MigState): boolean {
  return ruleOf(state).dma;
}

/** The device may raise interrupts: RUNNING, PRE_COPY, RUNNING_P2P, PRE_COPY_P2P. */
export function deviceMayInterrupt(state: MigState): boolean {
  return ruleOf(state).interrupts;
}

/** Fully operational (DMA and interrupts): RUNNING, PRE_COPY. */
export function deviceMayRun(state: MigState): boolean {
  const r = ruleOf(state);
  return r.dma && r.interrupts;
}

/** MIG_GET_PRECOPY_INFO is legal: PRE_COPY, PRE_COPY_P2P. */
export function allowsPrecopyInfo(state: MigState): boolean {
  return ruleOf(state).precopyInfo;
}

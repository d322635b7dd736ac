import { describe, expect, it } from "vitest";
import { Errno, MIG_STATE_COUNT, MigState, MigrationFlags } from "../../../protocol/constants.ts";
import { VfioUserError } from "../../../protocol/errors.ts";
import {
  ALL_FEATURE_SETS,
  ARCS,
  MAX_HOPS,
  MigrationFsm,
  NEXT_HOP,
  STATE_RULES,
  allowsDataRead,
  allowsDataWrite,
  allowsPrecopyInfo,
  arcsFor,
  deviceMayDma,
  deviceMayInterrupt,
  deviceMayRun,
  featuresFromFlags,
  featuresToFlags,
  isArc,
  isSaving,
  isSupported,
  migStateName,
  nextHop,
  pathTo,
  type MigrationFeatures,
} from "../../../src/migration/fsm.ts";

const ALL_STATES = Array.from({ length: MIG_STATE_COUNT }, (_, i) => i as MigState);
const { ERROR, STOP, RUNNING, STOP_COPY, RESUMING, RUNNING_P2P, PRE_COPY, PRE_COPY_P2P } = MigState;
const FULL: MigrationFeatures = { p2p: true, preCopy: true };

function featureName(f: MigrationFeatures): string {
  return `p2p=${f.p2p} preCopy=${f.preCopy}`;
}

function names(states: readonly MigState[]): string {
  return states.map(migStateName).join(" -> ");
}

/**
 * The rule of vfio.h, independent of the table: "Select the shortest path.
 * The path cannot have saving group states as interior arcs, only
 * starting/end states." Refinements the kernel's table follows:
 * - a walk between two saving states stays inside the saving group (the
 *   data session is shared by the group and leaving it would end it);
 * - RESUMING is never interior either (it would restart the session);
 * - STOP_COPY -> PRE_COPY and STOP_COPY -> PRE_COPY_P2P are refused;
 * - ERROR is never a target, nothing leaves ERROR, unsupported states refused.
 * Returns every shortest path (as lists of states after `from`), or null when
 * the request is refused.
 */
function shortestPaths(from: MigState, to: MigState, features: MigrationFeatures): MigState[][] | null {
  if (!isSupported(from, features) || !isSupported(to, features)) return null;
  if (from === to) return [[]];
  if (from === STOP_COPY && (to === PRE_COPY || to === PRE_COPY_P2P)) return null;
  const savingWalk = isSavingState(from) && isSavingState(to);
  const interiorOk = (s: MigState): boolean =>
    savingWalk ? isSavingState(s) : !isSavingState(s) && s !== RESUMING;

  const arcs = arcsFor(features);
  // Layered BFS keeping every shortest path.
  let frontier: MigState[][] = [[from]];
  const seen = new Set<MigState>([from]);
  for (let depth = 0; depth < MIG_STATE_COUNT; depth++) {
    const next: MigState[][] = [];
    const reached: MigState[][] = [];
    const layerSeen = new Set<MigState>();
    for (const path of frontier) {
      const tail = path[path.length - 1]!;
      for (const [a, b] of arcs) {
        if (a !== tail) continue;
        if (b === to) reached.push([...path.slice(1), b]);
        else if (!seen.has(b) && interiorOk(b)) {
          next.push([...path, b]);
          layerSeen.add(b);
        }
      }
    }
    if (reached.length > 0) return reached;
    for (const s of layerSeen) seen.add(s);
    if (next.length === 0) return null;
    frontier = next;
  }
  return null;
}

/** Saving group, written here from vfio.h rather than taken from the module. */
function isSavingState(s: MigState): boolean {
  return s === STOP_COPY || s === PRE_COPY || s === PRE_COPY_P2P;
}

describe("NEXT_HOP against breadth-first search over ARCS", () => {
  for (const features of ALL_FEATURE_SETS) {
    it(`matches for every ordered pair (${featureName(features)})`, () => {
      const mismatches: string[] = [];
      for (const from of ALL_STATES) {
        for (const to of ALL_STATES) {
          const paths = shortestPaths(from, to, features);
          const got = nextHop(from, to, features);
          if (paths === null) {
            if (got !== ERROR) mismatches.push(`${names([from, to])}: table ${migStateName(got)}, BFS refuses`);
            continue;
          }
          // The rule must leave no tie, or the table would need a tie-break.
          const firstHops = new Set(paths.map((p) => (p.length === 0 ? from : p[0]!)));
          if (firstHops.size !== 1) {
            mismatches.push(`${names([from, to])}: tie between ${[...firstHops].map(migStateName).join(", ")}`);
            continue;
          }
          const [want] = firstHops;
          if (got !== want) mismatches.push(`${names([from, to])}: table ${migStateName(got)}, BFS ${migStateName(want!)}`);
          // The whole walk is the BFS path, hop by hop.
          const walk = pathTo(from, to, features);
          if (!paths.some((p) => names(p) === names(walk))) {
            mismatches.push(`${names([from, to])}: walk ${names(walk)} is not a shortest path`);
          }
        }
      }
      expect(mismatches).toEqual([]);
    });

    it(`every hop the table takes is an arc that exists (${featureName(features)})`, () => {
      const used = new Set<string>();
      for (const from of ALL_STATES) {
        for (const to of ALL_STATES) {
          const hop = nextHop(from, to, features);
          if (hop === ERROR || hop === from) continue;
          expect(isArc(from, hop, features), `${names([from, hop])} is not an arc`).toBe(true);
          used.add(`${from}>${hop}`);
        }
      }
      // ...and every arc is used by some request: the arc list has no dead rows.
      const arcs = arcsFor(features).map(([a, b]) => `${a}>${b}`);
      expect([...used].sort()).toEqual([...arcs].sort());
    });
  }

  it("the literal table is 8x8 with ERROR row and column", () => {
    expect(NEXT_HOP).toHaveLength(MIG_STATE_COUNT);
    for (const row of NEXT_HOP) expect(row).toHaveLength(MIG_STATE_COUNT);
    for (const s of ALL_STATES) {
      expect(NEXT_HOP[ERROR]![s]).toBe(ERROR);
      expect(NEXT_HOP[s]![ERROR]).toBe(ERROR);
    }
  });

  it("arcs touch only states the feature set supports", () => {
    for (const features of ALL_FEATURE_SETS) {
      for (const [a, b] of arcsFor(features)) {
        expect(isSupported(a, features) && isSupported(b, features)).toBe(true);
      }
    }
    expect(ARCS.length).toBeGreaterThan(0);
  });

  it("walks the combination transitions listed in vfio_main.c (all features)", () => {
    const cases: Array<[MigState, MigState, MigState[]]> = [
      [PRE_COPY, STOP_COPY, [PRE_COPY_P2P, STOP_COPY]],
      [PRE_COPY, RUNNING_P2P, [RUNNING, RUNNING_P2P]],
      [PRE_COPY, STOP, [RUNNING, RUNNING_P2P, STOP]],
      [PRE_COPY, RESUMING, [RUNNING, RUNNING_P2P, STOP, RESUMING]],
      [PRE_COPY_P2P, RUNNING, [RUNNING_P2P, RUNNING]],
      [PRE_COPY_P2P, STOP, [RUNNING_P2P, STOP]],
      [PRE_COPY_P2P, RESUMING, [RUNNING_P2P, STOP, RESUMING]],
      [RESUMING, RUNNING_P2P, [STOP, RUNNING_P2P]],
      [RESUMING, PRE_COPY_P2P, [STOP, RUNNING_P2P, PRE_COPY_P2P]],
      [RESUMING, RUNNING, [STOP, RUNNING_P2P, RUNNING]],
      [RESUMING, PRE_COPY, [STOP, RUNNING_P2P, RUNNING, PRE_COPY]],
      [RESUMING, STOP_COPY, [STOP, STOP_COPY]],
      [RUNNING, PRE_COPY_P2P, [RUNNING_P2P, PRE_COPY_P2P]],
      [RUNNING, STOP, [RUNNING_P2P, STOP]],
      [RUNNING, RESUMING, [RUNNING_P2P, STOP, RESUMING]],
      [RUNNING, STOP_COPY, [RUNNING_P2P, STOP, STOP_COPY]],
      [RUNNING_P2P, PRE_COPY, [RUNNING, PRE_COPY]],
      [RUNNING_P2P, RESUMING, [STOP, RESUMING]],
      [RUNNING_P2P, STOP_COPY, [STOP, STOP_COPY]],
      [STOP, PRE_COPY_P2P, [RUNNING_P2P, PRE_COPY_P2P]],
      [STOP, RUNNING, [RUNNING_P2P, RUNNING]],
      [STOP, PRE_COPY, [RUNNING_P2P, RUNNING, PRE_COPY]],
      [STOP_COPY, RESUMING, [STOP, RESUMING]],
      [STOP_COPY, RUNNING_P2P, [STOP, RUNNING_P2P]],
      [STOP_COPY, RUNNING, [STOP, RUNNING_P2P, RUNNING]],
    ];
    for (const [from, to, want] of cases) expect(names(pathTo(from, to, FULL))).toBe(names(want));
  });

  it("degrades like the kernel when optional states are absent", () => {
    const none = { p2p: false, preCopy: false };
    const pre = { p2p: false, preCopy: true };
    const p2p = { p2p: true, preCopy: false };
    expect(pathTo(RUNNING, STOP, none)).toEqual([STOP]);
    expect(pathTo(STOP_COPY, RUNNING, none)).toEqual([STOP, RUNNING]);
    expect(pathTo(PRE_COPY, STOP_COPY, pre)).toEqual([STOP_COPY]);
    expect(pathTo(PRE_COPY, STOP, pre)).toEqual([RUNNING, STOP]);
    expect(pathTo(RESUMING, PRE_COPY, pre)).toEqual([STOP, RUNNING, PRE_COPY]);
    expect(pathTo(RUNNING, STOP_COPY, p2p)).toEqual([RUNNING_P2P, STOP, STOP_COPY]);
  });

  it("refuses what vfio.h refuses", () => {
    for (const features of ALL_FEATURE_SETS) {
      for (const s of ALL_STATES) {
        expect(nextHop(s, ERROR, features)).toBe(ERROR);
        expect(nextHop(ERROR, s, features)).toBe(ERROR);
      }
    }
    expect(nextHop(STOP_COPY, PRE_COPY, FULL)).toBe(ERROR);
    expect(nextHop(STOP_COPY, PRE_COPY_P2P, FULL)).toBe(ERROR);
    expect(nextHop(RUNNING, RUNNING_P2P, { p2p: false, preCopy: true })).toBe(ERROR);
    expect(nextHop(RUNNING, PRE_COPY, { p2p: true, preCopy: false })).toBe(ERROR);
    expect(nextHop(RUNNING, PRE_COPY_P2P, { p2p: true, preCopy: false })).toBe(ERROR);
    expect(nextHop(RUNNING, 8 as MigState, FULL)).toBe(ERROR);
    expect(nextHop(-1 as MigState, RUNNING, FULL)).toBe(ERROR);
    expect(() => pathTo(STOP_COPY, PRE_COPY, FULL)).toThrowError(VfioUserError);
  });
});

describe("MigrationFsm walks every ordered pair", () => {
  for (const features of ALL_FEATURE_SETS) {
    it(`reaches the target or refuses without change (${featureName(features)})`, async () => {
      for (const from of ALL_STATES.filter((s) => isSupported(s, features))) {
        for (const to of [...ALL_STATES, 8 as MigState, -1 as MigState, 2.5 as MigState]) {
          const fsm = new MigrationFsm(features, from);
          const hops: Array<[MigState, MigState]> = [];
          const paths = isSupported(to, features) ? shortestPaths(from, to, features) : null;
          const run = fsm.transition(to, (a, b) => {
            expect(fsm.state).toBe(a); // state moves only after the hop succeeded
            hops.push([a, b]);
          });
          if (paths === null) {
            const err = await run.then(
              () => null,
              (e: unknown) => e,
            );
            expect(err, `${migStateName(from)} -> ${migStateName(to)} should be refused`).toBeInstanceOf(VfioUserError);
            expect((err as VfioUserError).errno).toBe(Errno.EINVAL);
            expect(fsm.state).toBe(from);
            expect(hops).toEqual([]);
          } else {
            await run;
            expect(fsm.state).toBe(to);
            expect(hops.length).toBe(paths[0]!.length);
            expect(hops.length).toBeLessThanOrEqual(4);
            let cur = from;
            for (const [a, b] of hops) {
              expect(a).toBe(cur);
              expect(isArc(a, b, features)).toBe(true);
              cur = b;
            }
          }
          expect(fsm.busy).toBe(false);
        }
      }
    });
  }

  it("awaits asynchronous hop handlers in order", async () => {
    const fsm = new MigrationFsm(FULL, RUNNING);
    const log: string[] = [];
    await fsm.transition(STOP_COPY, async (a, b) => {
      await new Promise((r) => setTimeout(r, 1));
      log.push(`${migStateName(a)}>${migStateName(b)}`);
    });
    expect(log).toEqual(["RUNNING>RUNNING_P2P", "RUNNING_P2P>STOP", "STOP>STOP_COPY"]);
    expect(fsm.state).toBe(STOP_COPY);
  });

  it("a request for the current state calls nothing", async () => {
    const fsm = new MigrationFsm(FULL, STOP);
    let calls = 0;
    await fsm.transition(STOP, () => {
      calls++;
    });
    expect(calls).toBe(0);
    expect(fsm.state).toBe(STOP);
  });

  it("refuses an unsupported initial state", () => {
    expect(() => new MigrationFsm({ p2p: false, preCopy: false }, PRE_COPY)).toThrowError(VfioUserError);
    expect(() => new MigrationFsm(FULL, ERROR)).toThrowError(VfioUserError);
  });

  it("refuses a second transition while one is walking", async () => {
    const fsm = new MigrationFsm(FULL, RUNNING);
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const first = fsm.transition(STOP, () => gate);
    await expect(fsm.transition(RUNNING, () => {})).rejects.toMatchObject({ errno: Errno.EBUSY });
    release();
    await first;
    expect(fsm.state).toBe(STOP);
  });
});

describe("failures lead to ERROR, and only reset() leaves it", () => {
  it("a throwing hop leaves ERROR and rethrows the same error", async () => {
    const fsm = new MigrationFsm(FULL, RUNNING);
    const boom = new Error("device refused STOP");
    let n = 0;
    await expect(
      fsm.transition(STOP_COPY, () => {
        if (++n === 2) throw boom;
      }),
    ).rejects.toBe(boom);
    expect(n).toBe(2);
    expect(fsm.state).toBe(ERROR);
  });

  it("a rejecting async hop leaves ERROR", async () => {
    const fsm = new MigrationFsm(FULL, STOP);
    const boom = new VfioUserError(Errno.EIO, "load failed");
    await expect(fsm.transition(RESUMING, async () => Promise.reject(boom))).rejects.toBe(boom);
    expect(fsm.state).toBe(ERROR);
  });

  it("from ERROR every request is refused until reset()", async () => {
    for (const features of ALL_FEATURE_SETS) {
      const fsm = new MigrationFsm(features, RUNNING);
      await expect(
        fsm.transition(STOP, () => {
          throw new Error("x");
        }),
      ).rejects.toThrow("x");
      expect(fsm.state).toBe(ERROR);
      for (const to of ALL_STATES) {
        let called = false;
        await expect(
          fsm.transition(to, () => {
            called = true;
          }),
        ).rejects.toMatchObject({ errno: Errno.EINVAL });
        expect(called).toBe(false);
        expect(fsm.state).toBe(ERROR);
      }
      fsm.reset();
      expect(fsm.state).toBe(RUNNING);
      await fsm.transition(STOP_COPY, () => {});
      expect(fsm.state).toBe(STOP_COPY);
    }
  });

  it("reset() during a hop aborts the walk with EIO and keeps RUNNING", async () => {
    const fsm = new MigrationFsm(FULL, RUNNING);
    const walk = fsm.transition(STOP_COPY, async (a) => {
      if (a === RUNNING_P2P) fsm.reset();
    });
    await expect(walk).rejects.toMatchObject({ errno: Errno.EIO });
    expect(fsm.state).toBe(RUNNING);
    expect(fsm.busy).toBe(false);
  });

  it("a table that cycles is cut at MAX_HOPS: ERROR + EIO", async () => {
    // Never reaches STOP_COPY: bounces between STOP and RUNNING_P2P.
    const cycling = (from: MigState): MigState => (from === STOP ? RUNNING_P2P : STOP);
    const fsm = new MigrationFsm(FULL, RUNNING, { nextHop: cycling });
    let hops = 0;
    await expect(
      fsm.transition(STOP_COPY, () => {
        hops++;
      }),
    ).rejects.toMatchObject({ errno: Errno.EIO });
    expect(hops).toBe(MAX_HOPS);
    expect(fsm.state).toBe(ERROR);
    expect(() => pathTo(RUNNING, STOP_COPY, FULL, cycling)).toThrowError(/exceeds/);
  });

  it("a table that yields ERROR mid-walk: ERROR + EIO", async () => {
    const broken = (from: MigState, to: MigState): MigState => (from === RUNNING ? RUNNING_P2P : to === from ? from : ERROR);
    const fsm = new MigrationFsm(FULL, RUNNING, { nextHop: broken });
    await expect(fsm.transition(STOP, () => {})).rejects.toMatchObject({ errno: Errno.EIO });
    expect(fsm.state).toBe(ERROR);
  });
});

describe("state predicates", () => {
  // Columns: isSaving, allowsDataRead, allowsDataWrite, deviceMayDma,
  // deviceMayInterrupt, deviceMayRun, allowsPrecopyInfo.
  const T = true;
  const F = false;
  const table: Array<[MigState, boolean[]]> = [
    [ERROR, [F, F, F, F, F, F, F]],
    [STOP, [F, F, F, F, F, F, F]],
    [RUNNING, [F, F, F, T, T, T, F]],
    [STOP_COPY, [T, T, F, F, F, F, F]],
    [RESUMING, [F, F, T, F, F, F, F]],
    [RUNNING_P2P, [F, F, F, F, T, F, F]],
    [PRE_COPY, [T, T, F, T, T, T, T]],
    [PRE_COPY_P2P, [T, T, F, F, T, F, T]],
  ];
  for (const [state, want] of table) {
    it(migStateName(state), () => {
      expect([
        isSaving(state),
        allowsDataRead(state),
        allowsDataWrite(state),
        deviceMayDma(state),
        deviceMayInterrupt(state),
        deviceMayRun(state),
        allowsPrecopyInfo(state),
      ]).toEqual(want);
    });
  }

  it("covers every state and treats out-of-range values as ERROR", () => {
    expect(Object.keys(STATE_RULES)).toHaveLength(MIG_STATE_COUNT);
    expect(isSaving(99 as MigState)).toBe(false);
    expect(deviceMayRun(-1 as MigState)).toBe(false);
  });

  it("isSaving agrees with the saving group used by the BFS", () => {
    for (const s of ALL_STATES) expect(isSaving(s)).toBe(isSavingState(s));
  });
});

describe("migration feature flags", () => {
  it("round-trips every combination", () => {
    for (const f of ALL_FEATURE_SETS) expect(featuresFromFlags(featuresToFlags(f))).toEqual(f);
  });
  it("requires STOP_COPY and refuses unknown bits", () => {
    expect(() => featuresFromFlags(MigrationFlags.P2P)).toThrowError(VfioUserError);
    expect(() => featuresFromFlags(MigrationFlags.STOP_COPY | (1n << 5n))).toThrowError(VfioUserError);
  });
});

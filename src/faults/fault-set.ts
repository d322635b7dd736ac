/**
 * Faults on demand, at run time: the parsed faults of a server, each with
 * its count of matching events, and the hooks the server calls where each
 * kind of fault acts. A server without faults has no FaultSet, and every
 * hook site checks for null first, so faults cost nothing unless set.
 *
 * - commands (cmd=, feature=, after=, state=): the connection runs each
 *   client command through `command()`, which may refuse it (errno), hold
 *   it (delay) or close the connection instead of the reply (drop);
 * - arcs: the migration walker runs each hop through `arc()`, which may
 *   refuse the hop (the device stays where the hop began), fail it into
 *   ERROR, or hold it;
 * - MIG_DATA_READ, MIG_DATA_SIZE, pre-copy info: the handlers ask for the
 *   size to read and the figures to report;
 * - interrupts: the interrupt controller asks whether to hold a signal.
 *
 * A fault never touches the device's real state: refused or held commands
 * and arcs do nothing, a short read leaves the rest of the stream queued, a
 * corrupt read flips a bit of a copy, wrong figures are only reported. The
 * exception is the one the spec names: a failed arc may leave ERROR.
 * Every fault logs a warning when it fires.
 */
import type { Logger } from "pino";
import { COMMAND_NAMES, Command, Feature, FeatureFlags, MIG_STATE_NAMES, type MigState } from "../../protocol/constants.ts";
import { VfioUserError, errnoName } from "../../protocol/errors.ts";
import type { Header } from "../../protocol/header.ts";
import { INJECTED_FAULT } from "../conformance/recorder.ts";
import { ArcRefused } from "../migration/fsm.ts";
import { parseFault, type Fault } from "./language.ts";

/** Thrown by a `drop` fault: the connection closes instead of replying. */
export class ConnectionDrop extends Error {
  override readonly name = "ConnectionDrop";
}

interface Armed {
  readonly fault: Fault;
  /** Matching events so far. */
  seen: number;
}

/** What a command fault does to the command: run it (`next`) or not, now or later. */
export type CommandStep<R> = (next: () => R | Promise<R>) => R | Promise<R>;

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

function injected(errno: number, message: string): VfioUserError {
  return new VfioUserError(errno, `injected fault: ${message}`).with({ rule: INJECTED_FAULT });
}

export class FaultSet {
  private readonly commands: Armed[] = [];
  private readonly arcs: Armed[] = [];
  private readonly reads: Armed[] = [];
  private readonly sizes: Armed[] = [];
  private readonly precopy: Armed[] = [];
  private readonly irqs: Armed[] = [];
  /** Client messages so far, every connection (what after=N counts). */
  private messages = 0;
  private readonly log: Logger;

  constructor(
    faults: readonly Fault[],
    log: Logger,
    /** The device's migration state now (for in= and state=). */
    private readonly state: () => MigState,
  ) {
    this.log = log.child({ part: "faults" });
    for (const fault of faults) {
      const armed = { fault, seen: 0 };
      const { trigger, action } = fault;
      if (trigger.kind === "arc") this.arcs.push(armed);
      else if (trigger.kind === "irq") this.irqs.push(armed);
      else if (action.kind === "short" || action.kind === "corrupt") this.reads.push(armed);
      else if (action.kind === "size") this.sizes.push(armed);
      else if (action.kind === "precopy") this.precopy.push(armed);
      else this.commands.push(armed);
    }
  }

  /** A FaultSet for specs (parsed here) or parsed faults; null when there are none. */
  static of(faults: readonly (string | Fault)[] | undefined, log: Logger, state: () => MigState): FaultSet | null {
    if (!faults || faults.length === 0) return null;
    return new FaultSet(
      faults.map((f) => (typeof f === "string" ? parseFault(f) : f)),
      log,
      state,
    );
  }

  get hasIrqFaults(): boolean {
    return this.irqs.length > 0;
  }

  /** Counts a matching event; true when this one fires. */
  private hit(a: Armed): boolean {
    a.seen++;
    const { nth, times } = a.fault;
    return a.seen >= nth && (times === null || a.seen < nth + times);
  }

  private fired(a: Armed, fields: Record<string, unknown>, what: string): void {
    this.log.warn({ fault: a.fault.source, nth: a.seen, ...fields }, `fault injected: ${what}`);
  }

  private inState(a: Armed): boolean {
    return a.fault.in === null || a.fault.in === this.state();
  }

  // ---- commands ----

  /**
   * What the faults do to a client command: null when none fires (run it as
   * usual), else a step that wraps running it. Called once per command, in
   * order.
   */
  command<R>(header: Header, body: Buffer): CommandStep<R> | null {
    this.messages++;
    if (this.commands.length === 0) return null;
    let step: CommandStep<R> | null = null;
    // faults compose in the order given: the first one's step runs first, and runs the next
    const chain = (s: CommandStep<R>) => {
      const prev = step;
      step = prev === null ? s : (next) => prev(() => s(next));
    };
    for (const a of this.commands) {
      const t = a.fault.trigger;
      if (t.kind === "state") {
        if (!isStateSet(header, body)) continue;
        const want = t.state;
        chain((next) =>
          Promise.resolve(next()).then((reply) => {
            if (this.state() !== want || !this.hit(a)) return reply;
            this.fired(a, { msgId: header.msgId, state: MIG_STATE_NAMES[want] }, `connection dropped in ${MIG_STATE_NAMES[want]} instead of the reply`);
            throw new ConnectionDrop(`fault ${a.fault.source}`);
          }),
        );
        continue;
      }
      const matches =
        t.kind === "after" ? this.messages > t.messages : t.kind === "cmd" ? header.command === t.command : t.kind === "feature" ? featureOf(header, body) === t.feature : false;
      if (!matches || !this.inState(a) || !this.hit(a)) continue;
      const fields = { msgId: header.msgId, cmd: COMMAND_NAMES[header.command] ?? header.command };
      const action = a.fault.action;
      switch (action.kind) {
        case "errno":
          this.fired(a, fields, `refused with ${errnoName(action.errno)}`);
          chain(() => {
            throw injected(action.errno, `${a.fault.source}`);
          });
          break;
        case "delay":
          this.fired(a, fields, `held ${action.ms} ms`);
          chain((next) => sleep(action.ms).then(next));
          break;
        case "drop":
          this.fired(a, fields, "connection dropped instead of the reply");
          chain(() => {
            throw new ConnectionDrop(`fault ${a.fault.source}`);
          });
          break;
      }
    }
    return step;
  }

  // ---- migration arcs ----

  /** Runs one hop of the walker (`next`) under the arc faults. */
  arc(from: MigState, to: MigState, next: () => void | Promise<void>): void | Promise<void> {
    for (const a of this.arcs) {
      const t = a.fault.trigger;
      if (t.kind !== "arc" || t.from !== from || t.to !== to || !this.hit(a)) continue;
      const arc = `${MIG_STATE_NAMES[from]}>${MIG_STATE_NAMES[to]}`;
      const action = a.fault.action;
      switch (action.kind) {
        case "errno":
          this.fired(a, { from: MIG_STATE_NAMES[from], to: MIG_STATE_NAMES[to] }, `arc ${arc} refused with ${errnoName(action.errno)}; the device stays in ${MIG_STATE_NAMES[from]}`);
          throw new ArcRefused(action.errno, `injected fault: arc ${arc} refused`).with({ rule: INJECTED_FAULT });
        case "error":
          this.fired(a, { from: MIG_STATE_NAMES[from], to: MIG_STATE_NAMES[to] }, `arc ${arc} failed into ERROR (${errnoName(action.errno)})`);
          throw injected(action.errno, `arc ${arc} failed; the device is in ERROR`);
        case "delay":
          this.fired(a, { from: MIG_STATE_NAMES[from], to: MIG_STATE_NAMES[to] }, `arc ${arc} held ${action.ms} ms`);
          return sleep(action.ms).then(next);
      }
    }
    return next();
  }

  // ---- what the migration handlers read and report ----

  /** MIG_DATA_READ: how many bytes to read of the `size` asked, and the data offset to corrupt (or null). */
  migDataRead(header: Header, size: number): { size: number; corrupt: number | null } {
    let out = size;
    let corrupt: number | null = null;
    for (const a of this.reads) {
      if (!this.inState(a) || !this.hit(a)) continue;
      const action = a.fault.action;
      if (action.kind === "short") {
        out = Math.min(out, action.bytes);
        this.fired(a, { msgId: header.msgId, asked: size, size: out }, `short MIG_DATA_READ: ${out} of ${size} bytes (the rest stays queued)`);
      } else if (action.kind === "corrupt") {
        corrupt = action.offset;
        this.fired(a, { msgId: header.msgId, offset: action.offset }, `corrupt MIG_DATA_READ: a bit flipped at data offset ${action.offset}`);
      }
    }
    return { size: out, corrupt };
  }

  /** MIG_DATA_SIZE's stop_copy_length as reported. */
  stopCopySize(header: Header, real: bigint): bigint {
    let out = real;
    for (const a of this.sizes) {
      if (!this.inState(a) || !this.hit(a) || a.fault.action.kind !== "size") continue;
      out = a.fault.action.bytes;
      this.fired(a, { msgId: header.msgId, real: real.toString(), reported: out.toString() }, `MIG_DATA_SIZE reports ${out} instead of ${real}`);
    }
    return out;
  }

  /** Pre-copy info as reported. */
  precopyInfo(header: Header, real: { initialBytes: bigint; dirtyBytes: bigint }): { initialBytes: bigint; dirtyBytes: bigint } {
    let out = real;
    for (const a of this.precopy) {
      if (!this.inState(a) || !this.hit(a) || a.fault.action.kind !== "precopy") continue;
      const { initial, dirty } = a.fault.action;
      out = { initialBytes: initial ?? out.initialBytes, dirtyBytes: dirty ?? out.dirtyBytes };
      this.fired(a, { msgId: header.msgId, initial: out.initialBytes.toString(), dirty: out.dirtyBytes.toString() }, "pre-copy info reports other sizes");
    }
    return out;
  }

  // ---- interrupts ----

  /** How long to hold the interrupt the device signals now on (index, vector): undefined to send it, Infinity to lose it. */
  readonly irqHold = (index: number, vector: number): number | undefined => {
    for (const a of this.irqs) {
      const t = a.fault.trigger;
      if (t.kind !== "irq" || t.index !== index || (t.vector !== null && t.vector !== vector) || !this.inState(a) || !this.hit(a)) continue;
      if (a.fault.action.kind !== "stall") continue;
      const ms = a.fault.action.ms;
      this.fired(a, { index, vector }, ms === null ? "interrupt lost" : `interrupt held ${ms} ms`);
      return ms ?? Infinity;
    }
    return undefined;
  };
}

/** The feature a DEVICE_FEATURE GET or SET names; PROBEs and other commands give -1. */
function featureOf(header: Header, body: Buffer): number {
  if (header.command !== Command.DEVICE_FEATURE || body.length < 8) return -1;
  const flags = body.readUInt32LE(4);
  if ((flags & FeatureFlags.PROBE) !== 0) return -1;
  return flags & FeatureFlags.MASK;
}

function isStateSet(header: Header, body: Buffer): boolean {
  if (featureOf(header, body) !== Feature.MIG_DEVICE_STATE) return false;
  return (body.readUInt32LE(4) & FeatureFlags.SET) !== 0;
}

/**
 * Live migration of one device between two servers, driven by a client that
 * plays QEMU on both ends. The sequence follows QEMU's VFIO migration
 * (hw/vfio/migration.c) with the vfio-user transport:
 *
 *   attach      source and destination: GET MIGRATION (STOP_COPY required;
 *               PRE_COPY and P2P noted); source: PROBE DMA_LOGGING_START.
 *   setup       source: DMA_LOGGING_START over guest RAM, guest CPU write
 *               logging on, MIG_DATA_SIZE; destination: -> RESUMING (before
 *               the first MIG_DATA_WRITE); source: RUNNING -> PRE_COPY.
 *   pre-copy    rounds: precopy info; guest RAM (all of it in the first
 *               round, then the pages DMA_LOGGING_REPORT and the CPU log
 *               name) copied from the source RAM to the destination RAM;
 *               MIG_DATA_READ until a short read (bounded by what the round
 *               started with), each chunk written to the destination as it
 *               arrives. Stops when initial_bytes is 0 and what remains
 *               (initial + dirty bytes + dirty guest pages) is below the
 *               threshold, or after maxRounds.
 *   switch-over the VM stops (stopVm: no more MMIO, device quiet); source
 *               -> PRE_COPY_P2P when both ends offer P2P, -> STOP_COPY; read
 *               until empty; last REPORT + copy; DMA_LOGGING_STOP; source
 *               -> STOP; destination RESUMING -> STOP (its answer says
 *               whether the stream was accepted), [-> RUNNING_P2P],
 *               -> RUNNING; or, as QEMU does it (destinationResume
 *               "direct"), RESUMING -> [RUNNING_P2P ->] RUNNING without the
 *               STOP. Downtime runs from the STOP_COPY request (the P2P
 *               step included) to the destination reaching RUNNING.
 *
 * Failures: cancel() during setup or pre-copy, a refused stream at the
 * destination, or any error, bring the source back to RUNNING (logging
 * stopped, the VM resumed with resumeVm) so the device keeps working there.
 * The destination, which holds at most a partial or refused stream (and is
 * in ERROR after a refused RESUMING -> STOP), is reset with DEVICE_RESET
 * unless resetDestinationOnFailure is false.
 */
import { Feature, MigState, MigrationFlags, type MigState as MigStateValue } from "../../protocol/constants.ts";
import { VfioUserError } from "../../protocol/errors.ts";
import { stateName, type VfioUserClient } from "./client.ts";
import { GUEST_PAGE_SIZE, pagesOfBitmap, type GuestMemory } from "./guest-memory.ts";

/** One end of the migration: a negotiated client and the guest RAM it DMA_MAPped there. */
export interface MigrationSide {
  client: VfioUserClient;
  ram: GuestMemory;
}

export interface MigrationDriverOptions {
  /** Most pre-copy rounds before switching over anyway (default 10). */
  maxRounds?: number;
  /** Switch over once what remains is at most this many bytes (default 4 MiB). */
  thresholdBytes?: number;
  /** Bytes asked per MIG_DATA_READ (default: the source's max_data_xfer_size). */
  chunkSize?: number;
  /** MIG_DATA_WRITEs in flight to the destination at once (default 4). */
  writeWindow?: number;
  /** Use PRE_COPY_P2P / RUNNING_P2P when an end offers P2P (default true). */
  useP2P?: boolean;
  /** Stop the VM: when it resolves the workload issues no more MMIO and the device is quiet. */
  stopVm?: () => Promise<void>;
  /** Restart the VM on the source after a failure that happened after stopVm. */
  resumeVm?: () => Promise<void>;
  /** Runs when the destination accepted the stream (STOP), before it runs: wire its interrupts here. */
  beforeDestinationRunning?: () => Promise<void>;
  /** Reset the destination after a failure (default true). */
  resetDestinationOnFailure?: boolean;
  /**
   * How the destination leaves RESUMING: "via-stop" asks RESUMING -> STOP
   * (its answer says whether the stream was accepted), then RUNNING;
   * "direct" is QEMU's way, RESUMING -> RUNNING (or -> RUNNING_P2P, then
   * RUNNING) in one request, the stream validated and applied inside it.
   * Default "via-stop".
   */
  destinationResume?: "via-stop" | "direct";
  /** Called after each pre-copy round; a returned promise is waited for before the next round. */
  onRound?: (round: RoundStats) => void | Promise<void>;
  /** Progress messages. */
  onEvent?: (message: string) => void;
  /** Called after each device-data chunk (pre-copy and stop-copy): for progress displays. */
  onProgress?: (progress: MigrationProgress) => void;
  /** Transforms each stream chunk on its way to the destination (tests: corruption in transit). */
  streamFilter?: (chunk: Buffer, streamOffset: number) => Uint8Array;
}

export interface SideInfo {
  flags: bigint;
  preCopy: boolean;
  p2p: boolean;
}

export interface AttachInfo {
  source: SideInfo & { dirtyTracking: boolean };
  destination: SideInfo;
}

export interface RoundStats {
  round: number;
  /** Pre-copy info at the start of the round. */
  initialBytes: bigint;
  dirtyBytes: bigint;
  /** Device stream bytes moved in this round. */
  deviceBytes: number;
  /** Guest RAM pages copied in this round. */
  guestPages: number;
  elapsedMs: number;
}

/** Where a long round is: device bytes moved so far in this round or in stop-copy. */
export interface MigrationProgress {
  phase: "precopy" | "stop-copy";
  /** Pre-copy round number (stop-copy: the number of rounds before it). */
  round: number;
  /** Device bytes moved in this round (or in stop-copy) so far. */
  deviceBytes: number;
  /** What the round started with (pre-copy info initial + dirty; stop-copy: 0, unknown). */
  budgetBytes: number;
  /** Guest pages copied in this round. */
  guestPages: number;
  elapsedMs: number;
}

export interface MigrationResult {
  attach: AttachInfo;
  rounds: RoundStats[];
  /** MIG_DATA_SIZE when migration started. */
  stopCopyEstimate: bigint;
  precopyDeviceBytes: number;
  stopCopyDeviceBytes: number;
  deviceBytes: number;
  /** Guest pages copied by the first full pass. */
  guestFullCopyPages: number;
  /** Dirty guest pages copied after the full pass (later rounds and switch-over). */
  dirtyGuestPages: number;
  /** Dirty guest pages copied during the downtime. */
  finalGuestPages: number;
  guestBytes: number;
  /** Device stream plus guest RAM bytes moved. */
  totalBytes: number;
  downtimeMs: number;
  /** Where the downtime went. */
  downtime: DowntimeBreakdown;
  totalMs: number;
  p2p: boolean;
}

export interface DowntimeBreakdown {
  /** Source -> (PRE_COPY_P2P ->) STOP_COPY. */
  stopCopyMs: number;
  /** Reading the rest of the stream and writing it to the destination. */
  drainMs: number;
  /** Last dirty guest pages: report and copy. */
  guestMs: number;
  /** Destination RESUMING -> STOP: the stream validated and loaded. */
  loadMs: number;
  /** Destination STOP -> RUNNING, with beforeDestinationRunning. */
  startMs: number;
}

export type MigrationPhase = "attach" | "setup" | "precopy" | "stop-copy" | "resume" | "done";

/** The migration failed (or was cancelled); the source was brought back to RUNNING when possible. */
export class MigrationError extends Error {
  readonly phase: MigrationPhase;
  /** Which end failed. */
  readonly side: "source" | "destination" | "driver";
  /** The errno of the failing request, when it was a vfio-user error. */
  readonly errno: number | undefined;
  /** Source migration state after recovery (undefined when it could not be read). */
  sourceState: MigStateValue | undefined;
  /** Destination migration state after the failure handling. */
  destinationState: MigStateValue | undefined;

  constructor(message: string, phase: MigrationPhase, side: "source" | "destination" | "driver", cause: unknown) {
    super(message, { cause });
    this.name = "MigrationError";
    this.phase = phase;
    this.side = side;
    this.errno = cause instanceof VfioUserError ? cause.errno : undefined;
  }
}

export class MigrationCancelledError extends MigrationError {
  constructor(phase: MigrationPhase) {
    super(`migration cancelled during ${phase}`, phase, "driver", undefined);
    this.name = "MigrationCancelledError";
  }
}

/** A failure of the destination end, carried through the driver to the failure handling. */
class DestinationFailure extends Error {
  constructor(override readonly cause: unknown, readonly during: string) {
    super(`destination refused ${during}: ${(cause as Error).message}`);
  }
}

class Cancelled extends Error {}

function flagsInfo(flags: bigint): SideInfo {
  return { flags, preCopy: (flags & MigrationFlags.PRE_COPY) !== 0n, p2p: (flags & MigrationFlags.P2P) !== 0n };
}

const DEFAULT_THRESHOLD = 4 << 20;

export class MigrationDriver {
  private readonly opts: MigrationDriverOptions;
  private info: AttachInfo | null = null;
  private phase: MigrationPhase = "attach";
  private started = false;
  private finished = false;
  private cancelRequested = false;
  private settled: Promise<unknown> = Promise.resolve();

  // what has been done, for the failure path
  private logging = false;
  private vmStopped = false;
  private destinationTouched = false;
  private destinationStopRequested = false;

  // the stream to the destination
  private streamOffset = 0;
  private readonly inflight = new Set<Promise<void>>();
  private destinationError: DestinationFailure | null = null;

  constructor(
    readonly source: MigrationSide,
    readonly destination: MigrationSide,
    opts: MigrationDriverOptions = {},
  ) {
    this.opts = opts;
    if (source.ram.size !== destination.ram.size) throw new RangeError("source and destination guest RAM differ in size");
  }

  /** GET MIGRATION on both ends and PROBE DMA_LOGGING_START on the source. */
  async attach(): Promise<AttachInfo> {
    const src = this.source.client;
    const dst = this.destination.client;
    const [sflags, dflags] = await Promise.all([src.migrationFlags(), dst.migrationFlags()]);
    if ((sflags & MigrationFlags.STOP_COPY) === 0n) throw new MigrationError("the source device does not offer STOP_COPY migration", "attach", "source", undefined);
    if ((dflags & MigrationFlags.STOP_COPY) === 0n) throw new MigrationError("the destination device does not offer STOP_COPY migration", "attach", "destination", undefined);
    // QEMU probes with PROBE | DMA_LOGGING_START and neither GET nor SET
    const dirtyTracking = await src.probeFeature(Feature.DMA_LOGGING_START);
    this.info = { source: { ...flagsInfo(sflags), dirtyTracking }, destination: flagsInfo(dflags) };
    return this.info;
  }

  /**
   * Asks the migration to stop. Honoured during setup and pre-copy: the
   * source returns to RUNNING and run() rejects with MigrationCancelledError;
   * resolves true once that is done. Returns false once switch-over began.
   * (From inside onRound, do not await it: the driver waits for onRound.)
   */
  async cancel(): Promise<boolean> {
    if (!this.started || this.finished || (this.phase !== "setup" && this.phase !== "precopy")) return false;
    this.cancelRequested = true;
    await this.settled.catch(() => {});
    return true;
  }

  get currentPhase(): MigrationPhase {
    return this.phase;
  }

  /** Runs the whole migration; rejects with MigrationError (the source recovered) on failure. */
  run(): Promise<MigrationResult> {
    if (this.started) return Promise.reject(new Error("MigrationDriver.run() may be called once"));
    this.started = true;
    const p = this.execute().finally(() => {
      this.finished = true;
    });
    this.settled = p;
    return p;
  }

  private event(msg: string): void {
    this.opts.onEvent?.(msg);
  }

  private checkCancel(): void {
    if (this.cancelRequested) throw new Cancelled();
  }

  private async execute(): Promise<MigrationResult> {
    const startedAt = performance.now();
    const info = this.info ?? (await this.attach());
    const src = this.source;
    const dst = this.destination;
    const useP2P = this.opts.useP2P ?? true;
    const srcP2P = useP2P && info.source.p2p;
    const dstP2P = useP2P && info.destination.p2p;
    const chunk = Math.min(this.opts.chunkSize ?? src.client.maxDataXferSize, src.client.maxDataXferSize);
    const threshold = this.opts.thresholdBytes ?? DEFAULT_THRESHOLD;
    const maxRounds = Math.max(1, this.opts.maxRounds ?? 10);
    const rounds: RoundStats[] = [];
    let precopyDeviceBytes = 0;
    let stopCopyDeviceBytes = 0;
    let guestFullCopyPages = 0;
    let dirtyGuestPages = 0;
    try {
      // ---- setup ----
      this.phase = "setup";
      const [s0, d0] = await Promise.all([src.client.getMigState(), dst.client.getMigState()]);
      if (s0 !== MigState.RUNNING) throw new MigrationError(`the source device is in ${stateName(s0)}; migration starts from RUNNING`, "setup", "source", undefined);
      if (d0 !== MigState.RUNNING && d0 !== MigState.STOP) {
        throw new MigrationError(`the destination device is in ${stateName(d0)}; it must be RUNNING or STOP to resume a stream`, "setup", "destination", undefined);
      }
      if (info.source.dirtyTracking) {
        const pageSize = await src.client.dmaLoggingStart(BigInt(GUEST_PAGE_SIZE), [{ iova: src.ram.iova, length: src.ram.size }]);
        this.logging = true;
        this.event(`source: DMA logging started over ${src.ram.size} bytes of guest RAM (page ${pageSize})`);
      } else {
        this.event("source: no device dirty tracking; guest RAM is copied whole at switch-over");
      }
      src.ram.startCpuTracking();
      const stopCopyEstimate = await src.client.migDataSize();
      this.checkCancel();
      this.destinationTouched = true;
      await this.onDestination("RESUMING", () => dst.client.setMigState(MigState.RESUMING));
      if (info.source.preCopy) await src.client.setMigState(MigState.PRE_COPY);
      this.event(`source: ${info.source.preCopy ? "PRE_COPY" : "RUNNING (no pre-copy)"}, stop-copy estimate ${stopCopyEstimate} bytes; destination: RESUMING`);

      // ---- pre-copy rounds ----
      this.phase = "precopy";
      let carry: Uint8Array | "all" = "all";
      for (let round = 1; ; round++) {
        this.checkCancel();
        const t = performance.now();
        const pi = info.source.preCopy ? await src.client.precopyInfo() : { initialBytes: 0n, dirtyBytes: 0n };
        let pages: Uint8Array | "all";
        if (round === 1) {
          // everything is copied now: what was logged so far is covered
          if (this.logging) await this.reportGuest();
          src.ram.takeCpuDirtyPages();
          pages = "all";
        } else if (!this.logging) {
          pages = "all";
        } else {
          pages = await this.dirtyGuestBitmap(null);
        }
        const guestBytes = pages === "all" ? src.ram.size : BigInt(countBits(pages) * GUEST_PAGE_SIZE);
        const remaining = pi.initialBytes + pi.dirtyBytes + guestBytes;
        if (round > 1 && ((pi.initialBytes === 0n && remaining <= BigInt(threshold)) || round > maxRounds || !this.logging)) {
          carry = pages;
          this.event(`pre-copy done after ${rounds.length} round(s): ${remaining} bytes remain`);
          break;
        }
        // guest RAM
        let guestPages: number;
        if (pages === "all") {
          src.ram.copyAllTo(dst.ram);
          guestPages = src.ram.pages;
          guestFullCopyPages += guestPages;
        } else {
          guestPages = src.ram.copyPagesTo(dst.ram, pagesOfBitmap(pages, src.ram.pages));
          dirtyGuestPages += guestPages;
        }
        // device data, bounded by what the round started with so a busy device cannot keep one round going
        let deviceBytes = 0;
        if (info.source.preCopy) {
          const budget = Number(pi.initialBytes + pi.dirtyBytes);
          for (;;) {
            this.checkCancel();
            const data = await src.client.migDataRead(chunk);
            if (data.length > 0) await this.forward(data);
            deviceBytes += data.length;
            this.opts.onProgress?.({ phase: "precopy", round, deviceBytes, budgetBytes: budget, guestPages, elapsedMs: performance.now() - t });
            if (data.length < chunk || deviceBytes >= budget) break;
          }
          await this.drainWrites();
        }
        precopyDeviceBytes += deviceBytes;
        const stats: RoundStats = {
          round,
          initialBytes: pi.initialBytes,
          dirtyBytes: pi.dirtyBytes,
          deviceBytes,
          guestPages,
          elapsedMs: performance.now() - t,
        };
        rounds.push(stats);
        await this.opts.onRound?.(stats);
      }

      // ---- switch-over ----
      this.phase = "stop-copy";
      this.vmStopped = true;
      await this.opts.stopVm?.();
      const t0 = performance.now();
      const marks: number[] = [];
      if (srcP2P) await src.client.setMigState(info.source.preCopy ? MigState.PRE_COPY_P2P : MigState.RUNNING_P2P);
      await src.client.setMigState(MigState.STOP_COPY);
      marks.push(performance.now());
      for (;;) {
        const data = await src.client.migDataRead(chunk);
        if (data.length === 0) break;
        await this.forward(data);
        stopCopyDeviceBytes += data.length;
        this.opts.onProgress?.({ phase: "stop-copy", round: rounds.length, deviceBytes: stopCopyDeviceBytes, budgetBytes: 0, guestPages: 0, elapsedMs: performance.now() - t0 });
      }
      await this.drainWrites();
      marks.push(performance.now());
      // the last guest pages: what the device and the CPU wrote since the last round
      let finalGuestPages: number;
      if (carry === "all") {
        src.ram.copyAllTo(dst.ram);
        finalGuestPages = src.ram.pages;
        guestFullCopyPages += finalGuestPages;
      } else {
        const bitmap = await this.dirtyGuestBitmap(carry);
        finalGuestPages = src.ram.copyPagesTo(dst.ram, pagesOfBitmap(bitmap, src.ram.pages));
        dirtyGuestPages += finalGuestPages;
      }
      if (this.logging) {
        await src.client.dmaLoggingStop();
        this.logging = false;
      }
      src.ram.stopCpuTracking();
      await src.client.setMigState(MigState.STOP);
      marks.push(performance.now());

      this.phase = "resume";
      this.destinationStopRequested = true;
      if (this.opts.destinationResume === "direct") {
        // QEMU's way: the interrupts are wired while loading, and the first request out of RESUMING runs the device
        await this.opts.beforeDestinationRunning?.();
        const first = dstP2P ? MigState.RUNNING_P2P : MigState.RUNNING;
        await this.onDestination(`the stream (RESUMING -> ${stateName(first)})`, () => dst.client.setMigState(first));
        marks.push(performance.now());
        if (dstP2P) await this.onDestination("RUNNING", () => dst.client.setMigState(MigState.RUNNING));
      } else {
        await this.onDestination("the stream (RESUMING -> STOP)", () => dst.client.setMigState(MigState.STOP));
        marks.push(performance.now());
        await this.opts.beforeDestinationRunning?.();
        if (dstP2P) await this.onDestination("RUNNING_P2P", () => dst.client.setMigState(MigState.RUNNING_P2P));
        await this.onDestination("RUNNING", () => dst.client.setMigState(MigState.RUNNING));
      }
      const t1 = performance.now();
      const downtimeMs = t1 - t0;
      const [m0, m1, m2, m3] = marks as [number, number, number, number];
      const downtime: DowntimeBreakdown = { stopCopyMs: m0 - t0, drainMs: m1 - m0, guestMs: m2 - m1, loadMs: m3 - m2, startMs: t1 - m3 };
      this.phase = "done";
      this.event(`destination RUNNING; downtime ${downtimeMs.toFixed(1)} ms`);

      const deviceBytes = precopyDeviceBytes + stopCopyDeviceBytes;
      const guestBytes = (guestFullCopyPages + dirtyGuestPages) * GUEST_PAGE_SIZE;
      return {
        attach: info,
        rounds,
        stopCopyEstimate,
        precopyDeviceBytes,
        stopCopyDeviceBytes,
        deviceBytes,
        guestFullCopyPages,
        dirtyGuestPages,
        finalGuestPages,
        guestBytes,
        totalBytes: deviceBytes + guestBytes,
        downtimeMs,
        downtime,
        totalMs: performance.now() - startedAt,
        p2p: srcP2P || dstP2P,
      };
    } catch (err) {
      throw await this.fail(err);
    }
  }

  /** Runs a destination request; its failure is a DestinationFailure. */
  private async onDestination<T>(during: string, fn: () => Promise<T>): Promise<T> {
    try {
      return await fn();
    } catch (err) {
      throw new DestinationFailure(err, during);
    }
  }

  /** Sends a chunk to the destination, keeping up to writeWindow writes in flight. */
  private async forward(data: Buffer): Promise<void> {
    if (this.destinationError) throw this.destinationError;
    const out = this.opts.streamFilter ? this.opts.streamFilter(data, this.streamOffset) : data;
    this.streamOffset += data.length;
    const p: Promise<void> = this.destination.client.migDataWrite(out).then(
      () => {
        this.inflight.delete(p);
      },
      (err: unknown) => {
        this.inflight.delete(p);
        this.destinationError ??= new DestinationFailure(err, `MIG_DATA_WRITE at stream offset ${this.streamOffset - data.length}`);
      },
    );
    this.inflight.add(p);
    if (this.inflight.size >= (this.opts.writeWindow ?? 4)) await Promise.race(this.inflight);
    if (this.destinationError) throw this.destinationError;
  }

  private async drainWrites(): Promise<void> {
    await Promise.all([...this.inflight]);
    if (this.destinationError) throw this.destinationError;
  }

  /** DMA_LOGGING_REPORT over all guest RAM (clears it on the server). */
  private reportGuest(): Promise<Uint8Array> {
    const ram = this.source.ram;
    return this.source.client.dmaLoggingReport(ram.iova, ram.size, BigInt(GUEST_PAGE_SIZE));
  }

  /** Device-dirtied pages (REPORT) | CPU-dirtied pages | `carry`, as one bitmap. */
  private async dirtyGuestBitmap(carry: Uint8Array | null): Promise<Uint8Array> {
    const bitmap = this.logging ? await this.reportGuest() : new Uint8Array(Math.ceil(this.source.ram.pages / 64) * 8);
    for (const p of this.source.ram.takeCpuDirtyPages()) bitmap[p >>> 3]! |= 1 << (p & 7);
    if (carry) for (let i = 0; i < carry.length && i < bitmap.length; i++) bitmap[i]! |= carry[i]!;
    return bitmap;
  }

  /** The failure path: source back to RUNNING, destination reset; returns the error to throw. */
  private async fail(err: unknown): Promise<MigrationError> {
    const phase = this.phase;
    let error: MigrationError;
    if (err instanceof Cancelled) {
      error = new MigrationCancelledError(phase);
    } else if (err instanceof DestinationFailure) {
      let cause = err.cause;
      // a refused write: ask for the verdict the way QEMU's load would end, RESUMING -> STOP
      if (!this.destinationStopRequested && this.destination.client.closed === false) {
        this.destinationStopRequested = true;
        try {
          await this.destination.client.setMigState(MigState.STOP);
        } catch (verdict) {
          cause = verdict;
        }
      }
      error = new MigrationError(`${err.message}${cause !== err.cause ? `; RESUMING -> STOP: ${(cause as Error).message}` : ""}`, phase, "destination", cause);
    } else if (err instanceof MigrationError) {
      error = err;
    } else {
      error = new MigrationError(`migration failed during ${phase}: ${(err as Error).message}`, phase, "source", err);
    }
    this.event(`failure: ${error.message}; recovering the source`);
    // let writes in flight finish before touching the destination again
    await Promise.allSettled([...this.inflight]);

    // the source goes on running the device
    const src = this.source.client;
    if (!src.closed) {
      try {
        let state = await src.getMigState();
        if (state !== MigState.RUNNING && state !== MigState.ERROR) {
          await src.setMigState(MigState.RUNNING);
          state = await src.getMigState();
        }
        error.sourceState = state;
      } catch (e) {
        this.event(`source: could not return to RUNNING: ${(e as Error).message}`);
      }
      if (this.logging) {
        try {
          await src.dmaLoggingStop();
        } catch (e) {
          this.event(`source: DMA_LOGGING_STOP failed: ${(e as Error).message}`);
        }
      }
    }
    this.logging = false;
    this.source.ram.stopCpuTracking();
    if (this.vmStopped) {
      try {
        await this.opts.resumeVm?.();
      } catch (e) {
        this.event(`resuming the VM failed: ${(e as Error).message}`);
      }
    }

    // the destination holds nothing usable
    const dst = this.destination.client;
    if (this.destinationTouched && !dst.closed) {
      try {
        if (this.opts.resetDestinationOnFailure ?? true) await dst.reset();
        error.destinationState = await dst.getMigState();
      } catch (e) {
        this.event(`destination: reset failed: ${(e as Error).message}`);
      }
    }
    this.event(`source ${error.sourceState !== undefined ? stateName(error.sourceState) : "unreachable"}, destination ${error.destinationState !== undefined ? stateName(error.destinationState) : "untouched"}`);
    return error;
  }
}

function countBits(bitmap: Uint8Array): number {
  let n = 0;
  for (let i = 0; i < bitmap.length; i++) {
    let b = bitmap[i]!;
    while (b) {
      b &= b - 1;
      n++;
    }
  }
  return n;
}

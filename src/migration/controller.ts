/**
 * VFIO migration v2 for one device: walks the state machine (fsm.ts) one arc
 * at a time and does what each arc means for the device (stop, start, begin
 * or cancel pre-copy, produce the stop-copy stream, load a resumed stream),
 * produces MIG_DATA_READ bytes lazily from the device's memory so a page is
 * read when it is sent, and answers MIG_DATA_SIZE and pre-copy info.
 *
 * The stream (state-stream.ts): HEADER; in pre-copy MEMORY records (every
 * page once, then pages the device re-dirtied); at stop-copy one STATE record
 * (config space, MSI-X table, the device's saveState), the remaining MEMORY
 * records, END. The destination judges every record from its header
 * before taking a byte of its payload (a HEADER or STATE record over its cap,
 * MEMORY for a device without memory or longer than it: refused), checks the
 * HEADER the moment it arrives, writes MEMORY payload into device memory as
 * it arrives (so a resuming client can make the server hold one STATE record
 * at most, and the downtime does not grow with the device's size) with the
 * record's CRC checked at its end, and loads the STATE record only when
 * RESUMING -> STOP has validated the whole stream. A refused stream leaves no
 * half-loaded state: config space and device registers are untouched, and
 * device memory the stream had already written is reset to power-on together
 * with the rest of the device, at the refused MIG_DATA_WRITE itself.
 *
 * MIG_DATA_READ moves device memory without copying it when the device
 * offers `readPages` (see queueNextRecord): a record is a view of device
 * memory, its CRC is taken over the view once, and its bytes go to the
 * socket in the same synchronous step; the few bytes of it that stay queued
 * for the next read (under a page: records are sized to end near the reply)
 * are copied. So no queued byte refers to device memory when anything else
 * can run, in PRE_COPY (device running) as in STOP_COPY.
 *
 * Client BAR writes during STOP_COPY: the server does not refuse them.
 * vfio.h asks the device in STOP (and STOP_COPY "has the same behavior as
 * STOP") to keep answering config space and MSI-X, and leaves other region
 * accesses to the user: "The user should take steps to restrict access to
 * vfio device regions while the device is in STOP_COPY or risk corruption
 * of the device migration data stream". A refusal would have to tell BAR
 * from config space and MSI-X ranges (command-rules.ts sees only the
 * command). Instead the stream stays valid: nothing queued aliases device
 * memory (above), device memory is dirty-tracked in STOP_COPY as in
 * PRE_COPY, and pages written while stopped go again before END, so the
 * destination ends with what device memory holds when END is queued.
 * (Registers are not re-sent: the STATE record is the device as it
 * stopped; and what is written after END is not migrated.)
 */
import type { Logger } from "pino";
import type { PrecopyMemory } from "../device/api.ts";
import { MigState } from "../../protocol/constants.ts";
import { VfioUserError, fail } from "../../protocol/errors.ts";
import type { Endpoint } from "../server/endpoint.ts";
import { MigrationFsm, deviceMayRun, featuresToFlags, migStateName, type MigrationFeatures } from "./fsm.ts";
import { PageQueue } from "./page-queue.ts";
import { END_RECORD_SIZE, MEMORY_OFFSET_SIZE, RecordKind, StateStreamReader, StateStreamWriter, stateRecordSize, streamStartSize, type DecodedRecord, type MemorySink, type StreamHeader } from "./state-stream.ts";

/**
 * Most payload bytes of a HEADER record a destination takes: a few named
 * fields in msgpack (a HEADER is under 100 bytes in practice).
 */
export const MAX_HEADER_RECORD_LENGTH = 64 * 1024;
/**
 * Most payload bytes of a STATE record, on both ends: the config space, the
 * MSI-X table (32 KiB at most) and the device's own structured state. Bulk
 * memory belongs in MEMORY records (PrecopyMemory), which a destination
 * writes as they arrive; a STATE record is buffered whole, so this cap is
 * what a resuming client can make the server hold, about one
 * max_data_xfer_size.
 */
export const MAX_STATE_RECORD_LENGTH = 1024 * 1024;

/** Pages per MEMORY record: 1 MiB of 4 KiB pages. */
const PAGES_PER_RECORD = 256;
/** Framing bytes of one MEMORY record (kind, length, offset, crc). */
const MEMORY_RECORD_OVERHEAD = 5 + 8 + 4;

export interface MigrationOptions {
  /** Offer RUNNING_P2P / PRE_COPY_P2P (off by default; the vfio-user spec leaves P2P out). */
  p2p?: boolean;
}

interface DeviceSnapshot {
  config: Uint8Array;
  msix: Uint8Array | null;
  device: unknown;
  /** The source's client held INTx (signalled, not yet unmasked); absent in older streams = false. */
  intxHeld?: boolean;
}

export class MigrationController {
  readonly fsm: MigrationFsm;
  readonly features: MigrationFeatures;
  private writer: StateStreamWriter | null = null;
  private reader: StateStreamReader | null = null;
  /** Destination: STATE records seen, and whether device memory was written. */
  private resumeStates: unknown[] = [];
  private resumeWroteMemory = false;
  /** Most stream bytes any resume reader of this device held at once (see StateStreamReader.bufferedHighWater). */
  private resumeHighWater = 0;
  /** Pages queued to send, in order (first pass, then re-dirtied pages). */
  private readonly pagesToSend = new PageQueue();
  /** Pages of the first pass still unsent (for pre-copy info's initial_bytes). */
  private initialLeft = 0;
  /** Stop-copy: the END record goes once every page is out. */
  private endPending = false;
  /**
   * What the last MIG_DEVICE_STATE request finished, if it ended a
   * migration: the stream read to its END (source, STOP_COPY -> STOP) or a
   * stream loaded (destination, RESUMING -> STOP and on). Cleared by the
   * next request. A client leaving in STOP after one of these has completed
   * its migration (QEMU disconnects a source just so, DMA logging still on).
   */
  private finished: "saved" | "loaded" | null = null;
  /**
   * A migration is under way: a stream state (PRE_COPY, STOP_COPY,
   * RESUMING) was entered since the device last ran. A STOP without one is
   * a stopped VM (QEMU stops its devices when the guest powers off).
   */
  private streaming = false;
  private readonly log: Logger;

  constructor(
    private readonly endpoint: Endpoint,
    opts: MigrationOptions = {},
  ) {
    this.features = { p2p: opts.p2p ?? false, preCopy: true };
    this.fsm = new MigrationFsm(this.features);
    this.log = endpoint.log.child({ part: "migration" });
  }

  /** Most bytes of a resume stream this device's readers ever buffered at once (server accounting for tests). */
  get resumeBufferHighWater(): number {
    return Math.max(this.resumeHighWater, this.reader?.bufferedHighWater ?? 0);
  }

  get state(): MigState {
    return this.fsm.state;
  }

  get flags(): bigint {
    return featuresToFlags(this.features);
  }

  private get memory(): PrecopyMemory | undefined {
    return this.endpoint.device.precopyMemory;
  }

  /** MIG_DEVICE_STATE SET: walk to `to`; a failed arc leaves ERROR and rethrows. */
  async setState(to: MigState): Promise<void> {
    const from = this.fsm.state;
    this.finished = null;
    const faults = this.endpoint.faults;
    try {
      await this.fsm.transition(to, faults === null ? (a, b) => this.hop(a, b) : (a, b) => faults.arc(a, b, () => this.hop(a, b)));
    } finally {
      const now = this.fsm.state;
      if (now === MigState.RUNNING || now === MigState.RUNNING_P2P) this.streaming = false;
      this.endpoint.setRunning(deviceMayRun(now));
      if (now === MigState.ERROR) this.dropStreams();
      this.log.info({ from: migStateName(from), to: migStateName(to), now: migStateName(now) }, "migration state");
    }
  }

  /** DEVICE_RESET: back to RUNNING, streams dropped (recovers ERROR). */
  reset(): void {
    this.fsm.reset();
    this.dropStreams();
    this.finished = null;
    this.streaming = false;
  }

  /** A stream state was entered since the device last ran (see `streaming`). */
  get migrating(): boolean {
    return this.streaming;
  }

  /** The migration the last state request completed ("saved" on a source, "loaded" on a destination), or null. */
  get completed(): "saved" | "loaded" | null {
    return this.finished;
  }

  private dropStreams(): void {
    if (this.writer) this.memory?.stopTracking();
    this.writer = null;
    this.retireReader();
    this.resumeStates = [];
    this.pagesToSend.clear();
    this.initialLeft = 0;
    this.endPending = false;
  }

  private async hop(from: MigState, to: MigState): Promise<void> {
    // a running device finishes its in-flight work before it is told it stops
    if (deviceMayRun(from) && !deviceMayRun(to)) await this.endpoint.quiesce();
    // the device stops before the arc's work when the target may not run
    this.endpoint.setRunning(deviceMayRun(to) && deviceMayRun(from));
    const S = MigState;
    if (to === S.PRE_COPY || to === S.PRE_COPY_P2P || to === S.STOP_COPY || to === S.RESUMING) this.streaming = true;
    if (to === S.PRE_COPY && from === S.RUNNING || to === S.PRE_COPY_P2P && from === S.RUNNING_P2P) {
      this.beginSaving();
      const mem = this.memory;
      if (mem) {
        mem.startTracking();
        this.queuePages(mem.takeDirtyPages());
        this.initialLeft = this.pagesToSend.length;
      }
    } else if (to === S.STOP_COPY) {
      if (from === S.STOP) {
        this.beginSaving();
        const mem = this.memory;
        if (mem) {
          // tracked here too, so pages written while stopped go again before END
          mem.startTracking();
          this.queuePages(mem.takeDirtyPages());
        }
      } else {
        // from PRE_COPY(_P2P): what the device dirtied since goes after the unsent rest
        const mem = this.memory;
        if (mem) this.queuePages(mem.takeDirtyPages());
      }
      // a destination refuses a bigger STATE record (bulk memory belongs in precopyMemory)
      this.writer!.state(this.snapshot(), MAX_STATE_RECORD_LENGTH);
      this.endPending = true;
    } else if ((from === S.PRE_COPY || from === S.PRE_COPY_P2P) && (to === S.RUNNING || to === S.RUNNING_P2P)) {
      // cancelled: the device goes on as if nothing happened
      this.dropStreams();
    } else if (from === S.STOP_COPY && to === S.STOP) {
      // a source whose client read the stream to its END has migrated
      if (this.writer && !this.endPending && this.writer.pendingBytes === 0) this.finished = "saved";
      this.dropStreams();
    } else if (from === S.STOP && to === S.RESUMING) {
      this.resumeStates = [];
      this.resumeWroteMemory = false;
      this.reader = new StateStreamReader({
        onRecord: (r) => this.onResumeRecord(r),
        judgeRecord: (kind, length, at) => this.judgeResumeRecord(kind, length, at),
        memorySink: this.resumeMemorySink(),
      });
    } else if (from === S.RESUMING && to === S.STOP) {
      const reader = this.reader;
      this.retireReader();
      try {
        if (!reader) throw fail.io("no resume stream");
        reader.finish();
        this.loadState();
        this.finished = "loaded";
      } catch (err) {
        this.discardPartialResume();
        throw err;
      }
    }
  }

  private retireReader(): void {
    if (this.reader) this.resumeHighWater = Math.max(this.resumeHighWater, this.reader.bufferedHighWater);
    this.reader = null;
  }

  private beginSaving(): void {
    this.dropStreams();
    const w = new StateStreamWriter();
    w.header(this.streamHeader());
    this.writer = w;
  }

  private streamHeader(): StreamHeader {
    const dev = this.endpoint.device;
    return { deviceType: dev.type, deviceVersion: dev.stateVersion, configSize: this.endpoint.pci.config.size };
  }

  private queuePages(pages: Iterable<number>): void {
    this.pagesToSend.push(pages);
  }

  private snapshot(): DeviceSnapshot {
    return {
      config: this.endpoint.pci.config.snapshot(),
      msix: this.endpoint.pci.msixTable?.snapshot() ?? null,
      device: this.endpoint.device.saveState(),
      intxHeld: this.endpoint.irq.clientHoldsIntx,
    };
  }

  // ---- source: MIG_DATA_READ ----

  /**
   * Up to `max` bytes of the stream. Empty in PRE_COPY means nothing more
   * for now; empty in STOP_COPY means the end.
   *
   * The segments may be views of device memory (see queueNextRecord): the
   * caller sends them before it yields to the event loop, as the
   * MIG_DATA_READ handler does (the connection sends a reply synchronously
   * and the transport copies what the socket does not take at once).
   * Whatever of the stream stays queued after this call is a private copy.
   */
  read(max: number): Uint8Array[] {
    const w = this.writer;
    if (!w) return [];
    const stopCopy = this.fsm.state === MigState.STOP_COPY;
    const mem = this.memory;
    if (stopCopy && this.endPending && mem && mem.dirtyPageCount() > 0) {
      // Device memory was written while the device is stopped: a client's
      // BAR writes during STOP_COPY (vfio.h: "The user should take steps to
      // restrict access to vfio device regions while the device is in
      // STOP_COPY or risk corruption of the device migration data stream").
      // Nothing queued refers to device memory any more (settle below), so
      // the stream stays consistent: those pages go again, after the rest.
      // (Once END is queued the stream is complete; later writes are not
      // migrated.)
      this.queuePages(mem.takeDirtyPages());
    }
    this.fill(w, max);
    const out = w.readSegments(max);
    w.settle();
    return out;
  }

  private fill(w: StateStreamWriter, max: number): void {
    const mem = this.memory;
    const inPrecopy = this.fsm.state !== MigState.STOP_COPY;
    while (w.pendingBytes < max) {
      if (mem && this.pagesToSend.length > 0) {
        this.queueNextRecord(w, mem, max - w.pendingBytes);
        continue;
      }
      if (mem && (inPrecopy ? this.initialLeft === 0 : this.endPending)) {
        // pre-copy, first pass done: send what the device dirtied since, if
        // anything; stop-copy: what was written while stopped (see read())
        const before = this.pagesToSend.length;
        this.queuePages(mem.takeDirtyPages());
        if (this.pagesToSend.length > before) continue;
      }
      if (!inPrecopy && this.endPending) {
        w.end();
        this.endPending = false;
      }
      return;
    }
  }

  /**
   * The next record's pages: up to PAGES_PER_RECORD contiguous pages from
   * the cursor, and no more than it takes to cover `need` more bytes of the
   * stream, so at most a page of the record outlives the read that queued it.
   */
  private nextRun(mem: PrecopyMemory, need: number): { first: number; n: number } {
    const want = Math.min(PAGES_PER_RECORD, Math.max(1, Math.ceil((need - MEMORY_RECORD_OVERHEAD) / mem.pageSize)));
    return this.pagesToSend.take(want)!;
  }

  /**
   * One MEMORY record (see nextRun). With `readPages` its bytes are a view of
   * device memory, queued as transient: read() hands them out and settles
   * the unread rest (a copy of under a page) before it returns, in one
   * synchronous step, so the bytes sent are the bytes the CRC was taken
   * over, whether or not the device is running. Without it the pages are
   * copied into one buffer (not zero-filled first).
   */
  private queueNextRecord(w: StateStreamWriter, mem: PrecopyMemory, need: number): void {
    const size = mem.pageSize;
    const { first, n } = this.nextRun(mem, need);
    const transient = mem.readPages !== undefined;
    let bytes: Uint8Array;
    if (transient) {
      bytes = mem.readPages!(first, n);
      if (bytes.byteLength !== n * size) throw fail.io(`readPages(${first}, ${n}) returned ${bytes.byteLength} bytes, expected ${n * size}`);
    } else {
      bytes = Buffer.allocUnsafeSlow(n * size);
      for (let i = 0; i < n; i++) bytes.set(mem.readPage(first + i), i * size);
    }
    if (this.initialLeft > 0) this.initialLeft = Math.max(0, this.initialLeft - n);
    w.memory(BigInt(first) * BigInt(size), bytes, { transient });
  }


  /**
   * MIG_DATA_SIZE: bytes a stop-copy would still produce from here, what
   * QEMU's switch-over decision rests on: what is queued, every page still
   * to go (unsent, or dirtied since it was sent) with its record framing,
   * and, until stop-copy has queued them, the STATE record as it would be
   * now (the device's state encoded, so its size is exact) and END.
   */
  stopCopySize(): bigint {
    const mem = this.memory;
    const pageSize = mem?.pageSize ?? 0;
    let pages = this.pagesToSend.length;
    if (mem) pages += this.writer ? mem.dirtyPageCount() : Number(mem.size / BigInt(mem.pageSize));
    const records = Math.ceil(pages / PAGES_PER_RECORD);
    let bytes = (this.writer?.pendingBytes ?? 0) + pages * pageSize + records * MEMORY_RECORD_OVERHEAD;
    if (this.fsm.state !== MigState.STOP_COPY) {
      // no stream yet: its preamble and HEADER come first
      if (!this.writer) bytes += streamStartSize(this.streamHeader());
      bytes += stateRecordSize(this.snapshot()) + END_RECORD_SIZE;
    } else if (this.endPending) {
      bytes += END_RECORD_SIZE;
    }
    return BigInt(bytes);
  }

  /**
   * Pre-copy info: the bytes the first pass still has (initial_bytes), and
   * those of pages dirtied since they were sent (dirty_bytes), each with
   * its MEMORY record framing and whatever of it is already queued.
   */
  precopyInfo(): { initialBytes: bigint; dirtyBytes: bigint } {
    const mem = this.memory;
    const pageSize = mem?.pageSize ?? 0;
    const pending = this.writer?.pendingBytes ?? 0;
    const withFraming = (pages: number) => pages * pageSize + Math.ceil(pages / PAGES_PER_RECORD) * MEMORY_RECORD_OVERHEAD;
    const inFirstPass = this.initialLeft > 0;
    const initialBytes = inFirstPass ? withFraming(this.initialLeft) + pending : 0;
    const queuedDirty = inFirstPass ? 0 : this.pagesToSend.length;
    const dirtyBytes = withFraming(queuedDirty + (mem?.dirtyPageCount() ?? 0)) + (inFirstPass ? 0 : pending);
    return { initialBytes: BigInt(initialBytes), dirtyBytes: BigInt(dirtyBytes) };
  }

  // ---- destination: MIG_DATA_WRITE ----

  write(data: Uint8Array): void {
    if (!this.reader) throw fail.inval("no resume stream open");
    try {
      this.reader.push(data);
    } catch (err) {
      // bytes already written into device memory are not known good: back to power-on now
      this.discardPartialResume();
      throw err;
    }
  }

  /**
   * Each record judged from its header before a payload byte is taken:
   * what a resuming client can make the server hold is one STATE record
   * at most (MEMORY goes straight into device memory).
   */
  private judgeResumeRecord(kind: RecordKind, length: number, at: number): void {
    switch (kind) {
      case RecordKind.HEADER:
        if (length > MAX_HEADER_RECORD_LENGTH) {
          throw fail.inval(`HEADER record at offset ${at} declares ${length} bytes, above the limit of ${MAX_HEADER_RECORD_LENGTH}`);
        }
        return;
      case RecordKind.STATE:
        if (length > MAX_STATE_RECORD_LENGTH) {
          throw fail.inval(`STATE record at offset ${at} declares ${length} bytes, above the limit of ${MAX_STATE_RECORD_LENGTH}`);
        }
        return;
      case RecordKind.MEMORY: {
        const mem = this.memory;
        if (!mem) throw fail.inval(`MEMORY record at offset ${at}: this device has no device memory`);
        const data = length - MEMORY_OFFSET_SIZE;
        if (BigInt(data) > mem.size) {
          throw fail.inval(`MEMORY record at offset ${at} declares ${data} bytes of data, more than the device's ${mem.size} bytes of memory`);
        }
        if (data % mem.pageSize !== 0) {
          throw fail.inval(`MEMORY record at offset ${at} declares ${data} bytes of data, not a whole number of ${mem.pageSize}-byte pages`);
        }
        return;
      }
    }
  }

  /**
   * MEMORY data written into device memory as it arrives, whole pages
   * straight from the received bytes, a page split across writes staged
   * once. The record's CRC is checked at its end; a mismatch fails the
   * write and resets the device (see write()).
   */
  private resumeMemorySink(): MemorySink {
    let page = 0;
    let fill = 0;
    let staging: Uint8Array | null = null;
    return {
      begin: (offset, length, at) => {
        const mem = this.memory!;
        const size = mem.pageSize;
        if (offset % BigInt(size) !== 0n || offset + BigInt(length) > mem.size) {
          throw fail.inval(`MEMORY record at offset ${at} for device memory 0x${offset.toString(16)} (+${length}) does not fit device memory`);
        }
        page = Number(offset / BigInt(size));
        fill = 0;
        if (length > 0) this.resumeWroteMemory = true;
      },
      data: (bytes) => {
        const mem = this.memory!;
        const size = mem.pageSize;
        let at = 0;
        if (fill > 0) {
          const take = Math.min(size - fill, bytes.length);
          staging!.set(bytes.subarray(0, take), fill);
          fill += take;
          at = take;
          if (fill < size) return;
          mem.writePage(page++, staging!);
          fill = 0;
        }
        const whole = Math.floor((bytes.length - at) / size);
        if (whole > 0 && mem.writePages !== undefined) {
          mem.writePages(page, bytes.subarray(at, at + whole * size));
          page += whole;
          at += whole * size;
        } else {
          for (let i = 0; i < whole; i++) {
            mem.writePage(page++, bytes.subarray(at, at + size));
            at += size;
          }
        }
        if (at < bytes.length) {
          staging ??= new Uint8Array(size);
          staging.set(bytes.subarray(at), 0);
          fill = bytes.length - at;
        }
      },
      end: () => {
        // lengths are whole pages (judgeResumeRecord), so nothing is left staged
      },
    };
  }

  /** HEADER and STATE records as the reader validates them (MEMORY goes to resumeMemorySink): HEADER checked at once, STATE kept for RESUMING -> STOP. */
  private onResumeRecord(r: DecodedRecord): void {
    switch (r.kind) {
      case RecordKind.HEADER:
        this.checkHeader(r.header);
        return;
      case RecordKind.STATE:
        this.resumeStates.push(r.value);
        return;
      case RecordKind.MEMORY:
        // unreachable: MEMORY goes to the memory sink
        throw fail.io("MEMORY record reached the record handler");
    }
  }

  private checkHeader(header: StreamHeader): void {
    const dev = this.endpoint.device;
    if (header.deviceType !== dev.type) {
      throw fail.inval(`stream is for device type '${header.deviceType}', this device is '${dev.type}'`);
    }
    if (header.deviceVersion !== dev.stateVersion) {
      throw fail.inval(`stream has ${dev.type} state version ${header.deviceVersion}, this device speaks ${dev.stateVersion}`);
    }
  }

  /** Loads the STATE record of a fully validated stream, undoing on failure. */
  private loadState(): void {
    const dev = this.endpoint.device;
    const states = this.resumeStates;
    this.resumeStates = [];
    if (states.length !== 1) throw fail.inval(`stream carries ${states.length} STATE records, expected 1`);
    const snap = states[0] as DeviceSnapshot;
    if (typeof snap !== "object" || snap === null || !(snap.config instanceof Uint8Array)) throw fail.inval("STATE record is not a device snapshot");
    const before = this.snapshot();
    try {
      this.endpoint.pci.config.restore(snap.config);
      if (this.endpoint.pci.msixTable) {
        if (!(snap.msix instanceof Uint8Array)) throw new Error("STATE record lacks the MSI-X table");
        this.endpoint.pci.msixTable.restore(snap.msix);
      }
      dev.loadState(snap.device);
      this.endpoint.irq.adoptHeldIntx(snap.intxHeld === true);
    } catch (err) {
      try {
        this.endpoint.pci.config.restore(before.config);
        if (before.msix) this.endpoint.pci.msixTable?.restore(before.msix);
        dev.loadState(before.device);
      } catch (undoErr) {
        this.log.error({ err: (undoErr as Error).message }, "could not restore the previous state after a refused stream");
      }
      if (err instanceof VfioUserError) throw err;
      throw fail.inval(`device refused the state: ${(err as Error).message}`);
    }
    this.log.info("device state loaded");
  }

  /** A refused resume that already wrote device memory: back to power-on, nothing half-loaded. */
  private discardPartialResume(): void {
    if (!this.resumeWroteMemory) return;
    this.resumeWroteMemory = false;
    this.log.warn("refused resume stream had written device memory; device reset to power-on");
    this.endpoint.pci.reset();
    this.endpoint.device.reset();
  }
}


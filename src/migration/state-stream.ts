/**
 * The device-state byte stream: what MIG_DATA_READ hands out on the source and
 * MIG_DATA_WRITE takes in on the destination. VFIO treats it as opaque
 * (spec, vfio.h: "The user must consider the migration data stream carried
 * over the FD to be opaque and must preserve the byte order of the stream.
 * The user is not required to preserve buffer segmentation"), so both ends
 * work on arbitrary chunk boundaries.
 *
 * Layout (all integers little-endian):
 *
 *   preamble, 8 bytes
 *     0  magic    4 bytes  "VUDS" (0x56 0x55 0x44 0x53)
 *     4  version  u16      STREAM_VERSION (2); readers take 1 and 2
 *     6  flags    u16      0; no flags are defined, others are refused
 *
 *   then records, each
 *     0  kind     u8       RecordKind
 *     1  length   u32      payload bytes, at most the reader's limit
 *     5  payload  length bytes
 *     .  crc      u32      CRC-32C of kind, length and payload (version 2;
 *                             version 1 streams carry zlib's CRC-32 here)
 *
 *   kinds
 *     HEADER (1)  msgpack map { deviceType: string, deviceVersion: integer,
 *                 ...more fields }; exactly one, and first
 *     STATE  (2)  msgpack value: the device's structured state; any number
 *     MEMORY (3)  u64 offset, then raw bytes (device memory, never msgpack)
 *     END    (4)  empty; last. Without it the stream is truncated.
 *
 * msgpack is encoded without msgpackr's record extension (each value
 * describes itself) and 64-bit integers decode as bigint.
 *
 * The reader decides from a record header alone whether to go on: unknown
 * kind, a length above the limit, a non-empty END or a MEMORY record too short
 * for its offset fail before any payload is buffered, and so does whatever a
 * consumer's judgeRecord refuses. The payload is kept as the pieces that
 * arrived, so a lying length costs only the bytes actually sent; with a
 * memorySink, MEMORY payload is not kept at all but handed on as it arrives
 * (the server writes it into device memory and checks the CRC at the end).
 */
import { crc32 } from "node:zlib";
import { Packr } from "msgpackr";
import { Errno } from "../../protocol/constants.ts";
import { VfioUserError, fail } from "../../protocol/errors.ts";
import { U64_MAX } from "../../protocol/u64.ts";
import { crc32c } from "./crc32c.ts";

export const STREAM_MAGIC: readonly number[] = [0x56, 0x55, 0x44, 0x53]; // "VUDS"
/**
 * The version writers put in the preamble. 2: records carry CRC-32C
 * (hardware-accelerated in the addon, ~3x zlib's CRC-32 here). 1: zlib's
 * CRC-32, still read (snapshots saved by earlier builds).
 */
export const STREAM_VERSION = 2;
/** Versions a reader accepts. */
export const STREAM_VERSIONS_READ: readonly number[] = [1, 2];

type Checksum = (data: Uint8Array, crc?: number) => number;

/** The record check a stream of `version` uses (continuing from `crc`, default 0). */
export function recordChecksum(version: number = STREAM_VERSION): Checksum {
  if (version === 1) return crc32;
  if (version === 2) return crc32c;
  throw new RangeError(`no record check for stream version ${version}`);
}
export const PREAMBLE_SIZE = 8;
export const RECORD_HEADER_SIZE = 5;
export const RECORD_CRC_SIZE = 4;
/** Bytes of a MEMORY payload before the data: the u64 offset. */
export const MEMORY_OFFSET_SIZE = 8;
/** Default payload limit per record; devices split memory into smaller records. */
export const DEFAULT_MAX_RECORD_LENGTH = 256 * 1024 * 1024;
/** The length field is a u32. */
export const MAX_RECORD_LENGTH = 0xffff_ffff;

export const RecordKind = {
  HEADER: 1,
  STATE: 2,
  MEMORY: 3,
  END: 4,
} as const;
export type RecordKind = (typeof RecordKind)[keyof typeof RecordKind];

const KIND_NAMES: Readonly<Record<number, string>> = Object.fromEntries(
  Object.entries(RecordKind).map(([name, value]) => [value, name]),
);

/** HEADER payload. */
export interface StreamHeader {
  deviceType: string;
  deviceVersion: number;
  [field: string]: unknown;
}

export interface MemoryRecord {
  offset: bigint;
  bytes: Uint8Array;
}

export type DecodedRecord =
  | { kind: typeof RecordKind.HEADER; header: StreamHeader }
  | { kind: typeof RecordKind.STATE; value: unknown }
  | ({ kind: typeof RecordKind.MEMORY } & MemoryRecord);

export interface DecodedStream {
  header: StreamHeader;
  /** Every record after the header, in stream order (empty with an onRecord sink). */
  records: DecodedRecord[];
  /** STATE values in stream order (empty with an onRecord sink). */
  states: unknown[];
  /** MEMORY records in stream order (empty with an onRecord sink). */
  memory: MemoryRecord[];
  /** Bytes consumed, preamble to END inclusive. */
  byteLength: number;
}

const packr = new Packr({ useRecords: false, int64AsType: "bigint" });

function checkLimit(limit: number | undefined): number {
  const value = limit ?? DEFAULT_MAX_RECORD_LENGTH;
  if (!Number.isInteger(value) || value < MEMORY_OFFSET_SIZE || value > MAX_RECORD_LENGTH) {
    throw new RangeError(`record length limit ${value} must be an integer in [${MEMORY_OFFSET_SIZE}, ${MAX_RECORD_LENGTH}]`);
  }
  return value;
}

function kindName(kind: number): string {
  return KIND_NAMES[kind] ?? `kind ${kind}`;
}

function hex32(value: number): string {
  return `0x${value.toString(16).padStart(8, "0")}`;
}

function checkHeader(value: unknown): StreamHeader {
  if (typeof value !== "object" || value === null || Array.isArray(value)) throw new Error("not a map");
  const h = value as Record<string, unknown>;
  if (typeof h.deviceType !== "string" || h.deviceType.length === 0) throw new Error("deviceType must be a non-empty string");
  if (typeof h.deviceVersion !== "number" || !Number.isSafeInteger(h.deviceVersion) || h.deviceVersion < 0) {
    throw new Error("deviceVersion must be a non-negative integer");
  }
  return h as StreamHeader;
}

// ---------------------------------------------------------------------------
// Writer
// ---------------------------------------------------------------------------

export interface StateStreamWriterOptions {
  /** Largest payload per record (default DEFAULT_MAX_RECORD_LENGTH). */
  readonly maxRecordLength?: number;
}

/** How memory() holds a record's bytes. */
export interface MemoryRecordOptions {
  /**
   * The bytes are a view of memory that may change once the caller yields
   * (device memory of a running device, say). The CRC is taken now, as for
   * any record; the caller reads out what it needs and then calls
   * settle() before anything else can run, which copies whatever of these
   * bytes is still unread. So nothing queued refers to that memory across
   * a turn of the event loop, and the bytes sent are the bytes the CRC
   * covers.
   */
  readonly transient?: boolean;
}

/**
 * Source side. Records are queued as segments; bulk MEMORY bytes are queued
 * by reference (not copied) and must not change until they are read out: the
 * CRC is taken when the record is queued, so a later change is caught at the
 * destination rather than migrated silently. (Transient bytes, see MemoryRecordOptions, are held by
 * reference only until settle().)
 */
export class StateStreamWriter {
  readonly maxRecordLength: number;
  #segments: Uint8Array[] = [];
  /** #transient[i]: #segments[i] is a caller's transient view, copied by settle() while unread. */
  #transient: boolean[] = [];
  /** Read position inside #segments[0]. */
  #head = 0;
  #pending = 0;
  #bytesRead = 0;
  #started = false;
  #ended = false;

  constructor(options: StateStreamWriterOptions = {}) {
    this.maxRecordLength = checkLimit(options.maxRecordLength);
  }

  /** Bytes queued and not yet read. */
  get pendingBytes(): number {
    return this.#pending;
  }

  /** Bytes handed out by read()/readSegments() so far. */
  get bytesRead(): number {
    return this.#bytesRead;
  }

  /** end() was called. */
  get ended(): boolean {
    return this.#ended;
  }

  /** end() was called and everything was read. */
  get done(): boolean {
    return this.#ended && this.#pending === 0;
  }

  /** Starts the stream: preamble and HEADER record. Must come first, once. */
  header(meta: StreamHeader): void {
    if (this.#started) throw fail.io("state stream: header() called twice");
    try {
      checkHeader(meta);
    } catch (err) {
      throw fail.io(`state stream: bad header: ${(err as Error).message}`);
    }
    const preamble = new Uint8Array(PREAMBLE_SIZE);
    preamble.set(STREAM_MAGIC, 0);
    const view = new DataView(preamble.buffer);
    view.setUint16(4, STREAM_VERSION, true);
    view.setUint16(6, 0, true);
    this.#push(preamble);
    this.#started = true;
    this.#record(RecordKind.HEADER, packr.pack(meta));
  }

  /** A STATE record holding `value` as msgpack; refused (E2BIG) above `maxLength` (default the writer's limit). */
  state(value: unknown, maxLength = this.maxRecordLength): void {
    this.#checkOpen("state");
    const bytes = packr.pack(value);
    if (bytes.byteLength > maxLength) {
      throw fail.toobig(`state stream: STATE record of ${bytes.byteLength} bytes exceeds the limit of ${maxLength}`);
    }
    this.#record(RecordKind.STATE, bytes);
  }

  /**
   * A MEMORY record: `bytes` at device-memory `offset`, queued without
   * copying; the CRC is computed here, once, over the record as queued.
   */
  memory(offset: bigint, bytes: Uint8Array, options: MemoryRecordOptions = {}): void {
    this.#checkOpen("memory");
    if (offset < 0n || offset > U64_MAX) throw fail.io(`state stream: memory offset ${offset} is not a u64`);
    const length = MEMORY_OFFSET_SIZE + bytes.byteLength;
    this.#checkLength(RecordKind.MEMORY, length);
    const head = new Uint8Array(RECORD_HEADER_SIZE + MEMORY_OFFSET_SIZE);
    const view = new DataView(head.buffer);
    view.setUint8(0, RecordKind.MEMORY);
    view.setUint32(1, length, true);
    view.setBigUint64(RECORD_HEADER_SIZE, offset, true);
    const crc = crc32c(bytes, crc32c(head));
    this.#push(head);
    if (bytes.byteLength > 0) this.#push(bytes, options.transient === true);
    this.#push(crcBytes(crc));
  }

  /**
   * Copies the unread part of every transient segment (see
   * MemoryRecordOptions), so the queue no longer refers to the caller's
   * memory. Returns the bytes copied.
   */
  settle(): number {
    let copied = 0;
    const segs = this.#segments;
    const flags = this.#transient;
    for (let i = 0; i < segs.length; i++) {
      if (!flags[i]) continue;
      const from = i === 0 ? this.#head : 0;
      const own = new Uint8Array(segs[i]!.byteLength - from);
      own.set(segs[i]!.subarray(from));
      segs[i] = own;
      flags[i] = false;
      if (i === 0) this.#head = 0;
      copied += own.byteLength;
    }
    return copied;
  }

  /** The END record; nothing may follow. */
  end(): void {
    this.#checkOpen("end");
    this.#record(RecordKind.END, new Uint8Array(0));
    this.#ended = true;
  }

  /**
   * Up to `max` bytes of the stream, fewer when less is queued, empty when
   * nothing is. Zero-copy when the bytes come from one queued segment.
   */
  read(max: number): Uint8Array {
    const parts = this.readSegments(max);
    if (parts.length === 0) return new Uint8Array(0);
    if (parts.length === 1) return parts[0]!;
    let total = 0;
    for (const p of parts) total += p.byteLength;
    const out = new Uint8Array(total);
    let at = 0;
    for (const p of parts) {
      out.set(p, at);
      at += p.byteLength;
    }
    return out;
  }

  /**
   * Up to `max` bytes as views of the queued segments (for a vectored send):
   * nothing is copied. The views stay valid; the writer does not reuse them.
   * (Views of transient bytes show what that memory holds: send them before
   * yielding, see MemoryRecordOptions.)
   */
  readSegments(max: number): Uint8Array[] {
    const out: Uint8Array[] = [];
    let want = Math.max(0, Math.floor(max));
    while (want > 0 && this.#segments.length > 0) {
      const seg = this.#segments[0]!;
      const avail = seg.byteLength - this.#head;
      const take = Math.min(avail, want);
      out.push(seg.subarray(this.#head, this.#head + take));
      want -= take;
      this.#pending -= take;
      this.#bytesRead += take;
      if (take === avail) {
        this.#segments.shift();
        this.#transient.shift();
        this.#head = 0;
      } else {
        this.#head += take;
      }
    }
    return out;
  }

  #checkOpen(what: string): void {
    if (!this.#started) throw fail.io(`state stream: ${what}() before header()`);
    if (this.#ended) throw fail.io(`state stream: ${what}() after end()`);
  }

  #checkLength(kind: number, length: number): void {
    if (length > this.maxRecordLength) {
      throw fail.toobig(`state stream: ${kindName(kind)} record of ${length} bytes exceeds the limit of ${this.maxRecordLength}`);
    }
  }

  #record(kind: RecordKind, payload: Uint8Array): void {
    this.#checkLength(kind, payload.byteLength);
    const head = new Uint8Array(RECORD_HEADER_SIZE);
    const view = new DataView(head.buffer);
    view.setUint8(0, kind);
    view.setUint32(1, payload.byteLength, true);
    const crc = crc32c(payload, crc32c(head));
    this.#push(head);
    if (payload.byteLength > 0) this.#push(payload);
    this.#push(crcBytes(crc));
  }

  #push(seg: Uint8Array, transient = false): void {
    this.#segments.push(seg);
    this.#transient.push(transient);
    this.#pending += seg.byteLength;
  }
}

function crcBytes(crc: number): Uint8Array {
  const b = new Uint8Array(RECORD_CRC_SIZE);
  new DataView(b.buffer).setUint32(0, crc >>> 0, true);
  return b;
}

// ---------------------------------------------------------------------------
// Reader
// ---------------------------------------------------------------------------

export interface StateStreamReaderOptions {
  /** Largest payload accepted per record (default DEFAULT_MAX_RECORD_LENGTH). */
  readonly maxRecordLength?: number;
  /**
   * Receive each record, the HEADER first, once its CRC matched, instead of
   * collecting it; keeps memory bounded by one record. (A consumer judges
   * the HEADER here, before any MEMORY record can be applied.) A record delivered
   * here may still be followed by a damaged one: the stream is only known
   * good when finish() returns. An error thrown here fails the stream.
   */
  readonly onRecord?: (record: DecodedRecord) => void;
  /**
   * Judge each record from its header alone (kind, declared payload length,
   * stream offset), after the reader's own checks and before any payload
   * byte is taken: throw to refuse the stream there. This is how a consumer
   * bounds what a stream can make it hold.
   */
  readonly judgeRecord?: (kind: RecordKind, length: number, at: number) => void;
  /**
   * Take MEMORY payload as it arrives instead of buffering the record: the
   * reader collects the record's 8-byte offset, then hands every payload
   * byte to the sink in arrival order, then checks the CRC. So a MEMORY
   * record costs the reader nothing but its header, whatever its length.
   * The consumer applies bytes before they are known good: on a CRC
   * mismatch (or any later failure) it must undo what it applied (the
   * server resets the device). With a sink, MEMORY records reach neither
   * onRecord nor finish().
   */
  readonly memorySink?: MemorySink;
}

/** Where a reader with `memorySink` puts MEMORY payload as it arrives. */
export interface MemorySink {
  /** A MEMORY record starts: `length` data bytes (after the offset) for device offset `offset`; throw to refuse. */
  begin(offset: bigint, length: number, at: number): void;
  /** The next bytes of the record's data, in order. A view of the pushed chunk: copy what you keep. */
  data(bytes: Uint8Array): void;
  /** The record's CRC matched. */
  end(): void;
}

type Phase = "preamble" | "recordHeader" | "memoryOffset" | "payload" | "crc" | "ended";

/** Bytes a STATE record holding `value` takes in the stream (framing included). */
export function stateRecordSize(value: unknown): number {
  return RECORD_HEADER_SIZE + packr.pack(value).byteLength + RECORD_CRC_SIZE;
}

/** Bytes of a stream's start: the preamble and the HEADER record for `meta`. */
export function streamStartSize(meta: StreamHeader): number {
  return PREAMBLE_SIZE + RECORD_HEADER_SIZE + packr.pack(meta).byteLength + RECORD_CRC_SIZE;
}

/** Bytes of the END record. */
export const END_RECORD_SIZE = RECORD_HEADER_SIZE + RECORD_CRC_SIZE;

/**
 * Destination side. Fed in chunks of any size; every error is a
 * VfioUserError with EINVAL, thrown at the first byte that proves it (or by
 * finish() for truncation), and then thrown again by every later call.
 */
export class StateStreamReader {
  readonly maxRecordLength: number;
  readonly #onRecord: ((record: DecodedRecord) => void) | undefined;
  readonly #judge: ((kind: RecordKind, length: number, at: number) => void) | undefined;
  readonly #sink: MemorySink | undefined;
  /** The current record's payload goes to the sink, not to #pieces. */
  #sinking = false;
  #phase: Phase = "preamble";
  /** Fixed-size parts (preamble, record header, crc) collect here. */
  #fixed = new Uint8Array(PREAMBLE_SIZE);
  #fixedFill = 0;
  /** Stream offset of the next byte. */
  #offset = 0;
  /** Current record. */
  #kind = 0;
  #length = 0;
  #recordStart = 0;
  #crc = 0;
  #pieces: Uint8Array[] = [];
  #received = 0;
  #header: StreamHeader | undefined;
  #records: DecodedRecord[] = [];
  #failure: unknown;
  #finished = false;
  #bufferedHighWater = 0;
  /** The stream's version (from the preamble) and its record check. */
  #version = 0;
  #sum: Checksum = crc32c;

  constructor(options: StateStreamReaderOptions = {}) {
    this.maxRecordLength = checkLimit(options.maxRecordLength);
    this.#onRecord = options.onRecord;
    this.#judge = options.judgeRecord;
    this.#sink = options.memorySink;
  }

  /** Bytes accepted so far. */
  get byteLength(): number {
    return this.#offset;
  }

  /**
   * Most payload bytes this reader ever held at once for one record (the
   * server's own accounting of what a resuming client can make it buffer).
   */
  get bufferedHighWater(): number {
    return this.#bufferedHighWater;
  }

  /** The stream's version, once the preamble arrived (0 before). */
  get version(): number {
    return this.#version;
  }

  /** The END record arrived. */
  get ended(): boolean {
    return this.#phase === "ended";
  }

  /** The decoded HEADER, once it arrived. */
  get header(): StreamHeader | undefined {
    return this.#header;
  }

  /** Feed the next bytes. The chunk is not retained: payload bytes are copied. */
  push(chunk: Uint8Array): void {
    if (this.#failure !== undefined) throw this.#failure;
    if (this.#finished) throw fail.inval("state stream: push() after finish()");
    try {
      this.#consume(chunk);
    } catch (err) {
      this.#failure = err;
      throw err;
    }
  }

  /** Check the stream is complete and return what it held. */
  finish(): DecodedStream {
    if (this.#failure !== undefined) throw this.#failure;
    if (this.#phase !== "ended") {
      this.#failure = this.#truncation();
      throw this.#failure;
    }
    this.#finished = true;
    const records = this.#records;
    return {
      header: this.#header!,
      records,
      states: records.flatMap((r) => (r.kind === RecordKind.STATE ? [r.value] : [])),
      memory: records.flatMap((r) => (r.kind === RecordKind.MEMORY ? [{ offset: r.offset, bytes: r.bytes }] : [])),
      byteLength: this.#offset,
    };
  }

  #consume(chunk: Uint8Array): void {
    let at = 0;
    const n = chunk.byteLength;
    while (at < n) {
      switch (this.#phase) {
        case "preamble": {
          at += this.#fill(chunk, at, PREAMBLE_SIZE);
          if (this.#fixedFill === PREAMBLE_SIZE) this.#preamble();
          break;
        }
        case "recordHeader": {
          at += this.#fill(chunk, at, RECORD_HEADER_SIZE);
          if (this.#fixedFill === RECORD_HEADER_SIZE) this.#recordHeader();
          break;
        }
        case "memoryOffset": {
          at += this.#fill(chunk, at, MEMORY_OFFSET_SIZE);
          if (this.#fixedFill === MEMORY_OFFSET_SIZE) this.#memoryOffset();
          break;
        }
        case "payload": {
          const take = Math.min(n - at, this.#length - this.#received);
          const view = chunk.subarray(at, at + take);
          this.#crc = this.#sum(view, this.#crc);
          if (this.#sinking) {
            this.#sink!.data(view);
          } else {
            // A copy, and a plain Uint8Array (Buffer#slice would be a view).
            this.#pieces.push(new Uint8Array(view));
            if (this.#received + take > this.#bufferedHighWater) this.#bufferedHighWater = this.#received + take;
          }
          this.#received += take;
          this.#offset += take;
          at += take;
          if (this.#received === this.#length) this.#phase = "crc";
          break;
        }
        case "crc": {
          at += this.#fill(chunk, at, RECORD_CRC_SIZE);
          if (this.#fixedFill === RECORD_CRC_SIZE) this.#recordEnd();
          break;
        }
        case "ended":
          throw fail.inval(`state stream: ${n - at} byte(s) after the END record at offset ${this.#offset}`);
      }
    }
  }

  /** Copy up to `size - fill` bytes into the fixed buffer; returns bytes taken. */
  #fill(chunk: Uint8Array, at: number, size: number): number {
    const take = Math.min(size - this.#fixedFill, chunk.byteLength - at);
    this.#fixed.set(chunk.subarray(at, at + take), this.#fixedFill);
    this.#fixedFill += take;
    this.#offset += take;
    return take;
  }

  #preamble(): void {
    const b = this.#fixed;
    const view = new DataView(b.buffer, b.byteOffset, PREAMBLE_SIZE);
    for (let i = 0; i < STREAM_MAGIC.length; i++) {
      if (b[i] !== STREAM_MAGIC[i]) {
        throw fail.inval(`state stream: bad magic ${hex32(view.getUint32(0, false))} (want "VUDS") at offset 0`);
      }
    }
    const version = view.getUint16(4, true);
    if (!STREAM_VERSIONS_READ.includes(version)) {
      throw fail.inval(`state stream: unknown stream version ${version} (this build reads ${STREAM_VERSIONS_READ.join(" and ")})`);
    }
    this.#version = version;
    this.#sum = recordChecksum(version);
    const flags = view.getUint16(6, true);
    if (flags !== 0) throw fail.inval(`state stream: unknown stream flags 0x${flags.toString(16)} at offset 6`);
    this.#fixedFill = 0;
    this.#phase = "recordHeader";
  }

  #recordHeader(): void {
    const b = this.#fixed;
    const view = new DataView(b.buffer, b.byteOffset, RECORD_HEADER_SIZE);
    const kind = view.getUint8(0);
    const length = view.getUint32(1, true);
    const at = this.#offset - RECORD_HEADER_SIZE;
    if (KIND_NAMES[kind] === undefined) throw fail.inval(`state stream: unknown record kind ${kind} at offset ${at}`);
    if (this.#header === undefined && kind !== RecordKind.HEADER) {
      throw fail.inval(`state stream: first record is ${kindName(kind)} at offset ${at}, expected HEADER`);
    }
    if (this.#header !== undefined && kind === RecordKind.HEADER) throw fail.inval(`state stream: second HEADER record at offset ${at}`);
    if (length > this.maxRecordLength) {
      throw fail.inval(`state stream: ${kindName(kind)} record at offset ${at} declares ${length} bytes, above the limit of ${this.maxRecordLength}`);
    }
    if (kind === RecordKind.END && length !== 0) throw fail.inval(`state stream: END record at offset ${at} declares ${length} bytes, must be empty`);
    if (kind === RecordKind.MEMORY && length < MEMORY_OFFSET_SIZE) {
      throw fail.inval(`state stream: MEMORY record at offset ${at} declares ${length} bytes, less than its ${MEMORY_OFFSET_SIZE}-byte offset`);
    }
    this.#judge?.(kind as RecordKind, length, at);
    this.#kind = kind;
    this.#length = length;
    this.#recordStart = at;
    this.#crc = this.#sum(b.subarray(0, RECORD_HEADER_SIZE));
    this.#pieces = [];
    this.#received = 0;
    this.#fixedFill = 0;
    this.#sinking = kind === RecordKind.MEMORY && this.#sink !== undefined;
    this.#phase = this.#sinking ? "memoryOffset" : length === 0 ? "crc" : "payload";
  }

  /** A sunk MEMORY record's offset arrived: the sink judges it, then takes the data. */
  #memoryOffset(): void {
    const b = this.#fixed;
    const offset = new DataView(b.buffer, b.byteOffset, MEMORY_OFFSET_SIZE).getBigUint64(0, true);
    this.#crc = this.#sum(b.subarray(0, MEMORY_OFFSET_SIZE), this.#crc);
    this.#received = MEMORY_OFFSET_SIZE;
    this.#fixedFill = 0;
    this.#sink!.begin(offset, this.#length - MEMORY_OFFSET_SIZE, this.#recordStart);
    this.#phase = this.#received === this.#length ? "crc" : "payload";
  }

  #recordEnd(): void {
    const b = this.#fixed;
    const stored = new DataView(b.buffer, b.byteOffset, RECORD_CRC_SIZE).getUint32(0, true);
    const computed = this.#crc >>> 0;
    const kind = this.#kind;
    if (stored !== computed) {
      throw fail.inval(
        `state stream: CRC mismatch in ${kindName(kind)} record at offset ${this.#recordStart} ` +
          `(stored ${hex32(stored)}, computed ${hex32(computed)})`,
      );
    }
    this.#fixedFill = 0;
    if (this.#sinking) {
      this.#sinking = false;
      this.#phase = "recordHeader";
      this.#sink!.end();
      return;
    }
    const payload = this.#payload();
    this.#pieces = [];
    if (kind === RecordKind.END) {
      this.#phase = "ended";
      return;
    }
    this.#phase = "recordHeader";
    const record = this.#decode(kind, payload);
    if (record.kind === RecordKind.HEADER) {
      this.#header = record.header;
      // a streaming consumer judges the HEADER the moment it arrives (device type and version)
      this.#onRecord?.(record);
      return;
    }
    if (this.#onRecord) this.#onRecord(record);
    else this.#records.push(record);
  }

  #payload(): Uint8Array {
    const pieces = this.#pieces;
    if (pieces.length === 1) return pieces[0]!;
    const out = new Uint8Array(this.#length);
    let at = 0;
    for (const p of pieces) {
      out.set(p, at);
      at += p.byteLength;
    }
    return out;
  }

  #decode(kind: number, payload: Uint8Array): DecodedRecord {
    const at = this.#recordStart;
    switch (kind) {
      case RecordKind.HEADER: {
        let value: unknown;
        try {
          value = checkHeader(unpack(payload));
        } catch (err) {
          throw fail.inval(`state stream: bad HEADER record at offset ${at}: ${(err as Error).message}`);
        }
        return { kind: RecordKind.HEADER, header: value as StreamHeader };
      }
      case RecordKind.STATE: {
        try {
          return { kind: RecordKind.STATE, value: unpack(payload) };
        } catch (err) {
          throw fail.inval(`state stream: bad STATE record at offset ${at}: ${(err as Error).message}`);
        }
      }
      case RecordKind.MEMORY: {
        const view = new DataView(payload.buffer, payload.byteOffset, payload.byteLength);
        return { kind: RecordKind.MEMORY, offset: view.getBigUint64(0, true), bytes: payload.subarray(MEMORY_OFFSET_SIZE) };
      }
      default:
        // Unreachable: kinds are checked at the record header.
        throw new VfioUserError(Errno.EIO, `state stream: no decoder for record kind ${kind}`);
    }
  }

  #truncation(): VfioUserError {
    const at = this.#offset;
    switch (this.#phase) {
      case "preamble":
        return fail.inval(
          at === 0 ? "state stream: empty stream" : `state stream: truncated inside the preamble (${at} of ${PREAMBLE_SIZE} bytes)`,
        );
      case "recordHeader":
        return this.#fixedFill === 0
          ? fail.inval(`state stream: truncated: no END record (stream stops after ${at} bytes)`)
          : fail.inval(
              `state stream: truncated inside a record header at offset ${at - this.#fixedFill} (${this.#fixedFill} of ${RECORD_HEADER_SIZE} bytes)`,
            );
      case "memoryOffset":
      case "payload":
        return fail.inval(
          `state stream: truncated inside ${kindName(this.#kind)} record at offset ${this.#recordStart} ` +
            `(${this.#received} of ${this.#length} payload bytes)`,
        );
      case "crc":
        return fail.inval(
          `state stream: truncated inside the CRC of ${kindName(this.#kind)} record at offset ${this.#recordStart} ` +
            `(${this.#fixedFill} of ${RECORD_CRC_SIZE} bytes)`,
        );
      case "ended":
        return fail.io("state stream: not truncated");
    }
  }
}

function unpack(payload: Uint8Array): unknown {
  return packr.unpack(payload);
}

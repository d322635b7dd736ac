/**
 * The `data` of DEVICE_FEATURE for the features vfio-user uses (spec:
 * "Device Features"; structs from linux/vfio.h):
 *
 *   MIGRATION (1)          flags u64 (VFIO_MIGRATION_STOP_COPY / P2P / PRE_COPY)
 *   MIG_DEVICE_STATE (2)   device_state u32, data_fd s32
 *   DMA_LOGGING_START (6)  page_size u64, num_ranges u32, reserved u32,
 *   DMA_LOGGING_STOP (7)     then num_ranges x {iova u64, length u64} inline
 *   DMA_LOGGING_REPORT (8) request: iova u64, length u64, page_size u64;
 *                          reply: the same, then the bitmap at offset 24
 *   MIG_DATA_SIZE (9)      stop_copy_length u64 (vfio.h; not in the spec's table)
 *
 * In vfio.h the logging ranges and the bitmap are pointers; vfio-user carries
 * them inline after the fixed part.
 */
import { MessageSize, MIG_STATE_COUNT } from "../constants.ts";
import { fail } from "../errors.ts";
import { readU64 } from "../u64.ts";
import { allocBody, asBuffer, joinParts, needAtLeast, needExactly, putS32, putU32, putU64, viewOf } from "../wire.ts";

/** VFIO_DEVICE_FEATURE_MIGRATION data (GET reply). */
export interface FeatureMigration {
  /** `MigrationFlags.*`; STOP_COPY must be set. */
  flags: bigint;
}

/** VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE data (SET request, GET and SET replies). */
export interface FeatureMigState {
  /** `MigState.*`: the state to enter (SET) or the current one (GET). */
  device_state: number;
  /** Unused in vfio-user (data moves with MIG_DATA_READ/WRITE); `NO_DATA_FD` (-1) in replies. */
  data_fd: number;
}

/** One IOVA range to log. */
export interface DmaLoggingRange {
  /** Base IO virtual address. */
  iova: bigint;
  /** Length of the range. */
  length: bigint;
}

/** DMA_LOGGING_START / STOP data (SET request, and the reply echoing it). */
export interface DmaLoggingControl {
  /** Tracking granularity hint; the reply carries the one chosen. */
  page_size: bigint;
  /** Ranges to monitor; none means log every write. num_ranges on the wire is ranges.length. */
  ranges: DmaLoggingRange[];
}

/** DMA_LOGGING_REPORT request data (GET). */
export interface DmaLoggingReportRequest {
  /** Base IO virtual address. */
  iova: bigint;
  /** Length of the range. */
  length: bigint;
  /** Bitmap granularity; a power of two. */
  page_size: bigint;
}

/** DMA_LOGGING_REPORT reply data. */
export interface DmaLoggingReportReply extends DmaLoggingReportRequest {
  /**
   * Dirty bitmap, an array of little-endian u64s: bit n (byte n/8, bit n%8)
   * covers [iova + n*page_size, +page_size). Decoded: a view aliasing the body.
   */
  bitmap: Uint8Array;
}

/** VFIO_DEVICE_FEATURE_MIG_DATA_SIZE data (GET reply). */
export interface FeatureMigDataSize {
  /** Estimated bytes still to read to complete STOP_COPY. */
  stop_copy_length: bigint;
}

// --- MIGRATION ---

export function encodeFeatureMigration(msg: FeatureMigration): Buffer {
  const { buf, view } = allocBody(MessageSize.FEATURE_MIGRATION);
  putU64(view, 0, msg.flags);
  return buf;
}

export function decodeFeatureMigration(data: Uint8Array): FeatureMigration {
  needExactly(data, MessageSize.FEATURE_MIGRATION, "FEATURE_MIGRATION");
  return { flags: readU64(viewOf(data), 0) };
}

// --- MIG_DEVICE_STATE ---

export function encodeFeatureMigState(msg: FeatureMigState): Buffer {
  const { buf, view } = allocBody(MessageSize.FEATURE_MIG_STATE);
  putU32(view, 0, msg.device_state, "device_state");
  putS32(view, 4, msg.data_fd, "data_fd");
  return buf;
}

/** EINVAL when the data is not 8 bytes or device_state is not a vfio_device_mig_state value. */
export function decodeFeatureMigState(data: Uint8Array): FeatureMigState {
  const what = "FEATURE_MIG_DEVICE_STATE";
  needExactly(data, MessageSize.FEATURE_MIG_STATE, what);
  const view = viewOf(data);
  const device_state = view.getUint32(0, true);
  // spec: device_state "is defined by the vfio_device_mig_state enum"
  if (device_state >= MIG_STATE_COUNT) throw fail.inval(`${what}: unknown device_state ${device_state}`);
  return { device_state, data_fd: view.getInt32(4, true) };
}

// --- DMA_LOGGING_START / STOP ---

export function encodeDmaLoggingControl(msg: DmaLoggingControl): Buffer {
  const n = msg.ranges.length;
  const { buf, view } = allocBody(MessageSize.DMA_LOGGING_CONTROL_FIXED + n * MessageSize.DMA_LOGGING_RANGE);
  putU64(view, 0, msg.page_size);
  putU32(view, 8, n, "num_ranges");
  let p = MessageSize.DMA_LOGGING_CONTROL_FIXED;
  for (const r of msg.ranges) {
    putU64(view, p, r.iova);
    putU64(view, p + 8, r.length);
    p += MessageSize.DMA_LOGGING_RANGE;
  }
  return buf;
}

/**
 * Decodes START/STOP data. EINVAL when shorter than 16 bytes, reserved is
 * non-zero, or the length is not 16 + 16 x num_ranges.
 */
export function decodeDmaLoggingControl(data: Uint8Array): DmaLoggingControl {
  const what = "DMA_LOGGING control";
  needAtLeast(data, MessageSize.DMA_LOGGING_CONTROL_FIXED, what);
  const view = viewOf(data);
  const num = view.getUint32(8, true);
  // vfio.h names it __reserved; a non-zero value is a client bug or a future extension we do not know
  if (view.getUint32(12, true) !== 0) throw fail.inval(`${what}: reserved must be zero`).with({ rule: "must-be-zero", offset: 12 });
  // spec: "ranges | 16 | variable", an array of num_ranges {iova, length}
  if (data.length !== MessageSize.DMA_LOGGING_CONTROL_FIXED + num * MessageSize.DMA_LOGGING_RANGE) {
    throw fail.inval(`${what}: ${data.length} bytes do not hold ${num} ranges`);
  }
  const ranges: DmaLoggingRange[] = new Array(num);
  for (let i = 0, p = MessageSize.DMA_LOGGING_CONTROL_FIXED; i < num; i++, p += MessageSize.DMA_LOGGING_RANGE) {
    ranges[i] = { iova: readU64(view, p), length: readU64(view, p + 8) };
  }
  return { page_size: readU64(view, 0), ranges };
}

/**
 * vfio.h's struct vfio_device_feature_dma_logging_control: page_size u64,
 * num_ranges u32, __reserved u32, then `ranges` as a u64 user pointer to the
 * array, 24 bytes. A client that forwards the ioctl's struct over the socket
 * sends this instead of the ranges inline.
 */
export const KERNEL_DMA_LOGGING_CONTROL_SIZE = 24;

/**
 * The layout of START/STOP data: "spec" when its length is 16 + 16 x
 * num_ranges, "kernel" when it is the ioctl's 24-byte struct with ranges
 * behind a pointer at offset 16 (num_ranges > 0, so the length cannot be the
 * spec's), "other" for anything else. Judges nothing; decodeDmaLoggingControl does.
 */
export function dmaLoggingControlLayout(data: Uint8Array): "spec" | "kernel" | "other" {
  if (data.length < MessageSize.DMA_LOGGING_CONTROL_FIXED) return "other";
  const num = viewOf(data).getUint32(8, true);
  if (data.length === MessageSize.DMA_LOGGING_CONTROL_FIXED + num * MessageSize.DMA_LOGGING_RANGE) return "spec";
  if (data.length === KERNEL_DMA_LOGGING_CONTROL_SIZE && num > 0) return "kernel";
  return "other";
}

// --- DMA_LOGGING_REPORT ---

/**
 * vfio.h's struct vfio_device_feature_dma_logging_report: iova, length,
 * page_size, then `bitmap` as a u64 user pointer, 32 bytes.
 */
export const KERNEL_DMA_LOGGING_REPORT_SIZE = 32;

/**
 * The layout of REPORT request data: "spec" (24 bytes), "kernel" (the ioctl's
 * 32-byte struct, bitmap pointer at offset 24, optionally followed by a
 * bitmap-sized buffer of its own, as QEMU's migration prototype sends it),
 * or "other". Judges nothing; decodeDmaLoggingReportRequest does.
 */
export function dmaLoggingReportLayout(data: Uint8Array): "spec" | "kernel" | "other" {
  if (data.length === MessageSize.DMA_LOGGING_REPORT_FIXED) return "spec";
  if (data.length < KERNEL_DMA_LOGGING_REPORT_SIZE) return "other";
  if (data.length === KERNEL_DMA_LOGGING_REPORT_SIZE) return "kernel";
  const view = viewOf(data);
  const length = readU64(view, 8);
  const page = readU64(view, 16);
  if (!isPowerOfTwo(page)) return "other";
  return BigInt(data.length - KERNEL_DMA_LOGGING_REPORT_SIZE) === dmaLoggingBitmapSize(length, page) ? "kernel" : "other";
}

function isPowerOfTwo(v: bigint): boolean {
  return v > 0n && (v & (v - 1n)) === 0n;
}

/** Bitmap bytes for a report over `length` bytes at `page_size` granularity: whole u64s, one bit per page. */
export function dmaLoggingBitmapSize(length: bigint, page_size: bigint): bigint {
  if (page_size <= 0n) throw new RangeError(`page_size must be positive: ${page_size}`);
  const pages = (length + page_size - 1n) / page_size;
  return ((pages + 63n) / 64n) * 8n;
}

function writeReportFixed(msg: DmaLoggingReportRequest): Buffer {
  const { buf, view } = allocBody(MessageSize.DMA_LOGGING_REPORT_FIXED);
  putU64(view, 0, msg.iova);
  putU64(view, 8, msg.length);
  putU64(view, 16, msg.page_size);
  return buf;
}

export function encodeDmaLoggingReportRequest(msg: DmaLoggingReportRequest): Buffer {
  return writeReportFixed(msg);
}

/** EINVAL when the data is not 24 bytes or page_size is not a power of two. */
export function decodeDmaLoggingReportRequest(data: Uint8Array): DmaLoggingReportRequest {
  const what = "DMA_LOGGING_REPORT";
  needExactly(data, MessageSize.DMA_LOGGING_REPORT_FIXED, what);
  const view = viewOf(data);
  const page_size = readU64(view, 16);
  // spec: page_size "must be a power of two"
  if (!isPowerOfTwo(page_size)) throw fail.inval(`${what}: page_size ${page_size} is not a power of two`);
  return { iova: readU64(view, 0), length: readU64(view, 8), page_size };
}

/** The reply data as [fixed part, bitmap]; the bitmap is referenced, not cloned. */
export function encodeDmaLoggingReportReplyParts(msg: DmaLoggingReportReply): Uint8Array[] {
  if (msg.bitmap.length % 8 !== 0) throw new RangeError(`bitmap of ${msg.bitmap.length} bytes is not whole u64s`);
  return [writeReportFixed(msg), msg.bitmap];
}

export function encodeDmaLoggingReportReply(msg: DmaLoggingReportReply): Buffer {
  return joinParts(encodeDmaLoggingReportReplyParts(msg));
}

/** EINVAL when under 24 bytes or the bitmap is not whole u64s. The bitmap aliases `data`. */
export function decodeDmaLoggingReportReply(data: Uint8Array): DmaLoggingReportReply {
  const what = "DMA_LOGGING_REPORT reply";
  needAtLeast(data, MessageSize.DMA_LOGGING_REPORT_FIXED, what);
  // spec: "The bitmap is an array of u64s" at offset 24
  if ((data.length - MessageSize.DMA_LOGGING_REPORT_FIXED) % 8 !== 0) {
    throw fail.inval(`${what}: bitmap of ${data.length - MessageSize.DMA_LOGGING_REPORT_FIXED} bytes is not whole u64s`);
  }
  const view = viewOf(data);
  return {
    iova: readU64(view, 0),
    length: readU64(view, 8),
    page_size: readU64(view, 16),
    bitmap: asBuffer(data).subarray(MessageSize.DMA_LOGGING_REPORT_FIXED),
  };
}

// --- MIG_DATA_SIZE ---

export function encodeFeatureMigDataSize(msg: FeatureMigDataSize): Buffer {
  const { buf, view } = allocBody(MessageSize.FEATURE_MIG_DATA_SIZE);
  putU64(view, 0, msg.stop_copy_length);
  return buf;
}

export function decodeFeatureMigDataSize(data: Uint8Array): FeatureMigDataSize {
  needExactly(data, MessageSize.FEATURE_MIG_DATA_SIZE, "FEATURE_MIG_DATA_SIZE");
  return { stop_copy_length: readU64(viewOf(data), 0) };
}

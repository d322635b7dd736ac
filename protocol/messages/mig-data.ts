/**
 * VFIO_USER_MIG_DATA_READ and VFIO_USER_MIG_DATA_WRITE (spec: sections of
 * the same names): the migration data stream, in place of vfio.h's data_fd.
 *
 *   MIG_DATA_READ request (8):    argsz u32 (max reply size), size u32 (bytes wanted)
 *   MIG_DATA_READ reply:          argsz u32 (8 + size), size u32, data
 *   MIG_DATA_WRITE request:       argsz u32, size u32, data
 *   MIG_DATA_WRITE reply:         no payload
 *
 * A READ reply with size below the one requested means no more data for now.
 */
import { MessageSize } from "../constants.ts";
import { fail } from "../errors.ts";
import { allocBody, asBuffer, checkCount, joinParts, needArgsz, needAtLeast, needExactly, putU32, viewOf } from "../wire.ts";

/** Client -> server: read up to `size` bytes of migration data. */
export interface MigDataReadRequest {
  /** Maximum size of the reply payload (8 + data). */
  argsz: number;
  /** Bytes of migration data wanted. */
  size: number;
}

/** Server -> client. */
export interface MigDataReadReply {
  /** Size of the reply payload, 8 + size. */
  argsz: number;
  /** Bytes returned; equals data.length. Less than requested: no more data for now. */
  size: number;
  /** Migration data (decoded: a view aliasing the body). */
  data: Uint8Array;
}

/** Client -> server: append `data` to the destination's migration stream. */
export interface MigDataWriteRequest {
  /** Maximum size of the reply payload. */
  argsz: number;
  /** Bytes carried; equals data.length. */
  size: number;
  /** Migration data (decoded: a view aliasing the body). */
  data: Uint8Array;
}

/** Server -> client: no payload. */
export type MigDataWriteReply = Record<string, never>;

function fixed(argsz: number, size: number): Buffer {
  const { buf, view } = allocBody(MessageSize.MIG_DATA_FIXED);
  putU32(view, 0, argsz, "argsz");
  putU32(view, 4, size, "size");
  return buf;
}

function decodeWithData(body: Uint8Array, what: string): { argsz: number; size: number; data: Buffer } {
  needAtLeast(body, MessageSize.MIG_DATA_FIXED, what);
  const view = viewOf(body);
  const size = view.getUint32(4, true);
  if (body.length - MessageSize.MIG_DATA_FIXED !== size) {
    throw fail.inval(`${what}: size ${size} but ${body.length - MessageSize.MIG_DATA_FIXED} data bytes`).with({ rule: "count-mismatch", offset: 4 });
  }
  return { argsz: view.getUint32(0, true), size, data: asBuffer(body).subarray(MessageSize.MIG_DATA_FIXED) };
}

export function encodeMigDataReadRequest(msg: MigDataReadRequest): Buffer {
  return fixed(msg.argsz, msg.size);
}

/** EINVAL unless the body is 8 bytes and argsz can hold the reply's fixed part. */
export function decodeMigDataReadRequest(body: Uint8Array): MigDataReadRequest {
  const what = "MIG_DATA_READ";
  needExactly(body, MessageSize.MIG_DATA_FIXED, what);
  const view = viewOf(body);
  const argsz = view.getUint32(0, true);
  // spec: "argsz is the maximum size of the reply payload", which starts with 8 fixed bytes
  needArgsz(argsz, MessageSize.MIG_DATA_FIXED, what);
  return { argsz, size: view.getUint32(4, true) };
}

/** The reply as [fixed part, data]; data is referenced, not cloned. */
export function encodeMigDataReadReplyParts(msg: MigDataReadReply): Uint8Array[] {
  checkCount(msg.size, msg.data.length, "MIG_DATA_READ reply");
  return [fixed(msg.argsz, msg.size), msg.data];
}

export function encodeMigDataReadReply(msg: MigDataReadReply): Buffer {
  return joinParts(encodeMigDataReadReplyParts(msg));
}

/** EINVAL when the body is short or its data length differs from size. The data aliases `body`. */
export function decodeMigDataReadReply(body: Uint8Array): MigDataReadReply {
  return decodeWithData(body, "MIG_DATA_READ reply");
}

/** The request as [fixed part, data]; data is referenced, not cloned. */
export function encodeMigDataWriteRequestParts(msg: MigDataWriteRequest): Uint8Array[] {
  checkCount(msg.size, msg.data.length, "MIG_DATA_WRITE");
  return [fixed(msg.argsz, msg.size), msg.data];
}

export function encodeMigDataWriteRequest(msg: MigDataWriteRequest): Buffer {
  return joinParts(encodeMigDataWriteRequestParts(msg));
}

/** EINVAL when the body is short or its data length differs from size. The data aliases `body`. */
export function decodeMigDataWriteRequest(body: Uint8Array): MigDataWriteRequest {
  return decodeWithData(body, "MIG_DATA_WRITE");
}

export function encodeMigDataWriteReply(_msg: MigDataWriteReply = {}): Buffer {
  return Buffer.alloc(0);
}

/** spec: "There is no reply payload for this message." */
export function decodeMigDataWriteReply(body: Uint8Array): MigDataWriteReply {
  needExactly(body, 0, "MIG_DATA_WRITE reply");
  return {};
}

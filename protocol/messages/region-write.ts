/**
 * VFIO_USER_REGION_WRITE (spec: "VFIO_USER_REGION_WRITE").
 *
 * Request:                   Reply (16 bytes):
 *   0  offset u64              0  offset u64
 *   8  region u32              8  region u32
 *  12  count  u32             12  count  u32
 *  16  data   `count` bytes
 */
import { MessageSize } from "../constants.ts";
import { fail } from "../errors.ts";
import { readU64 } from "../u64.ts";
import { allocBody, asBuffer, checkCount, joinParts, needAtLeast, needExactly, putU32, putU64, viewOf } from "../wire.ts";

/** Client -> server: write `data` at `offset` of region `region`. */
export interface RegionWriteRequest {
  /** Offset into the region. */
  offset: bigint;
  /** Region index. */
  region: number;
  /** Bytes to write; equals data.length. */
  count: number;
  /** The bytes (decoded: a view aliasing the body). */
  data: Uint8Array;
}

/** Server -> client. */
export interface RegionWriteReply {
  /** Offset into the region accessed. */
  offset: bigint;
  /** Region index accessed. */
  region: number;
  /** Bytes transferred. */
  count: number;
}

function encodeAccess(offset: bigint, region: number, count: number): Buffer {
  const { buf, view } = allocBody(MessageSize.REGION_ACCESS_FIXED);
  putU64(view, 0, offset);
  putU32(view, 8, region, "region");
  putU32(view, 12, count, "count");
  return buf;
}

/** The request as [fixed part, data]; data is referenced, not cloned. */
export function encodeRegionWriteRequestParts(msg: RegionWriteRequest): Uint8Array[] {
  checkCount(msg.count, msg.data.length, "REGION_WRITE");
  return [encodeAccess(msg.offset, msg.region, msg.count), msg.data];
}

export function encodeRegionWriteRequest(msg: RegionWriteRequest): Buffer {
  return joinParts(encodeRegionWriteRequestParts(msg));
}

/** EINVAL when the body is short or its data length differs from count. The data aliases `body`. */
export function decodeRegionWriteRequest(body: Uint8Array): RegionWriteRequest {
  const what = "REGION_WRITE";
  needAtLeast(body, MessageSize.REGION_ACCESS_FIXED, what);
  const view = viewOf(body);
  const count = view.getUint32(12, true);
  if (body.length - MessageSize.REGION_ACCESS_FIXED !== count) {
    throw fail.inval(`${what}: count ${count} but ${body.length - MessageSize.REGION_ACCESS_FIXED} data bytes`);
  }
  return {
    offset: readU64(view, 0),
    region: view.getUint32(8, true),
    count,
    data: asBuffer(body).subarray(MessageSize.REGION_ACCESS_FIXED),
  };
}

export function encodeRegionWriteReply(msg: RegionWriteReply): Buffer {
  return encodeAccess(msg.offset, msg.region, msg.count);
}

export function decodeRegionWriteReply(body: Uint8Array): RegionWriteReply {
  needExactly(body, MessageSize.REGION_ACCESS_FIXED, "REGION_WRITE reply");
  const view = viewOf(body);
  return { offset: readU64(view, 0), region: view.getUint32(8, true), count: view.getUint32(12, true) };
}

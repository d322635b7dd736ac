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
import { decodeRegionAccessWithData, encodeRegionAccess } from "./access.ts";
import { readU64 } from "../u64.ts";
import { checkCount, joinParts, needExactly, viewOf } from "../wire.ts";

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

/** The request as [fixed part, data]; data is referenced, not cloned. */
export function encodeRegionWriteRequestParts(msg: RegionWriteRequest): Uint8Array[] {
  checkCount(msg.count, msg.data.length, "REGION_WRITE");
  return [encodeRegionAccess(msg.offset, msg.region, msg.count), msg.data];
}

export function encodeRegionWriteRequest(msg: RegionWriteRequest): Buffer {
  return joinParts(encodeRegionWriteRequestParts(msg));
}

/** EINVAL when the body is short or its data length differs from count. The data aliases `body`. */
export function decodeRegionWriteRequest(body: Uint8Array): RegionWriteRequest {
  return decodeRegionAccessWithData(body, "REGION_WRITE");
}

export function encodeRegionWriteReply(msg: RegionWriteReply): Buffer {
  return encodeRegionAccess(msg.offset, msg.region, msg.count);
}

export function decodeRegionWriteReply(body: Uint8Array): RegionWriteReply {
  needExactly(body, MessageSize.REGION_ACCESS_FIXED, "REGION_WRITE reply");
  const view = viewOf(body);
  return { offset: readU64(view, 0), region: view.getUint32(8, true), count: view.getUint32(12, true) };
}

/**
 * VFIO_USER_REGION_READ (spec: "VFIO_USER_REGION_READ").
 *
 * Request (16 bytes):        Reply:
 *   0  offset u64              0  offset u64
 *   8  region u32              8  region u32
 *  12  count  u32             12  count  u32
 *                             16  data   `count` bytes read
 *
 * spec: count "must not exceed the value of max_data_xfer_size of the peer"
 * (checked by the handler, which knows the negotiated value).
 */
import { MessageSize } from "../constants.ts";
import { decodeRegionAccessWithData, encodeRegionAccess } from "./access.ts";
import { readU64 } from "../u64.ts";
import { checkCount, joinParts, needExactly, viewOf } from "../wire.ts";

/** Client -> server: read `count` bytes at `offset` of region `region`. */
export interface RegionReadRequest {
  /** Offset into the region. */
  offset: bigint;
  /** Region index. */
  region: number;
  /** Bytes to read. */
  count: number;
}

/** Server -> client. */
export interface RegionReadReply {
  /** Offset into the region accessed. */
  offset: bigint;
  /** Region index accessed. */
  region: number;
  /** Bytes transferred; equals data.length. */
  count: number;
  /** The bytes read (decoded: a view aliasing the body). */
  data: Uint8Array;
}

export function encodeRegionReadRequest(msg: RegionReadRequest): Buffer {
  return encodeRegionAccess(msg.offset, msg.region, msg.count);
}

/** EINVAL unless the body is exactly 16 bytes. */
export function decodeRegionReadRequest(body: Uint8Array): RegionReadRequest {
  needExactly(body, MessageSize.REGION_ACCESS_FIXED, "REGION_READ");
  const view = viewOf(body);
  return { offset: readU64(view, 0), region: view.getUint32(8, true), count: view.getUint32(12, true) };
}

/** The reply as [fixed part, data] so large data is not copied; data is referenced, not cloned. */
export function encodeRegionReadReplyParts(msg: RegionReadReply): Uint8Array[] {
  checkCount(msg.count, msg.data.length, "REGION_READ reply");
  return [encodeRegionAccess(msg.offset, msg.region, msg.count), msg.data];
}

export function encodeRegionReadReply(msg: RegionReadReply): Buffer {
  return joinParts(encodeRegionReadReplyParts(msg));
}

/** EINVAL when the body is short or its data length differs from count. The data aliases `body`. */
export function decodeRegionReadReply(body: Uint8Array): RegionReadReply {
  return decodeRegionAccessWithData(body, "REGION_READ reply");
}

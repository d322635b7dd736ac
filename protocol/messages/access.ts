/**
 * The fixed parts shared by the data-moving messages:
 *
 *   region access (REGION_READ / REGION_WRITE, 16 bytes):
 *     0 offset u64, 8 region u32, 12 count u32, then `count` data bytes
 *   DMA access (DMA_READ / DMA_WRITE, 16 bytes):
 *     0 address u64, 8 count u64, then `count` data bytes
 */
import { MessageSize } from "../constants.ts";
import { fail } from "../errors.ts";
import { readU64 } from "../u64.ts";
import { allocBody, asBuffer, needAtLeast, putU32, putU64, viewOf } from "../wire.ts";

export function encodeRegionAccess(offset: bigint, region: number, count: number): Buffer {
  const { buf, view } = allocBody(MessageSize.REGION_ACCESS_FIXED);
  putU64(view, 0, offset);
  putU32(view, 8, region, "region");
  putU32(view, 12, count, "count");
  return buf;
}

/** A region access followed by exactly `count` data bytes (a view aliasing `body`); EINVAL otherwise. */
export function decodeRegionAccessWithData(body: Uint8Array, what: string): { offset: bigint; region: number; count: number; data: Buffer } {
  needAtLeast(body, MessageSize.REGION_ACCESS_FIXED, what);
  const view = viewOf(body);
  const count = view.getUint32(12, true);
  if (body.length - MessageSize.REGION_ACCESS_FIXED !== count) {
    throw fail.inval(`${what}: count ${count} but ${body.length - MessageSize.REGION_ACCESS_FIXED} data bytes`).with({ rule: "count-mismatch", offset: 12 });
  }
  return {
    offset: readU64(view, 0),
    region: view.getUint32(8, true),
    count,
    data: asBuffer(body).subarray(MessageSize.REGION_ACCESS_FIXED),
  };
}

export function encodeDmaAccess(address: bigint, count: bigint): Buffer {
  const { buf, view } = allocBody(MessageSize.DMA_ACCESS_FIXED);
  putU64(view, 0, address);
  putU64(view, 8, count);
  return buf;
}

/** A DMA access followed by exactly `count` data bytes (a view aliasing `body`); EINVAL otherwise. */
export function decodeDmaAccessWithData(body: Uint8Array, what: string): { address: bigint; count: bigint; data: Buffer } {
  needAtLeast(body, MessageSize.DMA_ACCESS_FIXED, what);
  const view = viewOf(body);
  const count = readU64(view, 8);
  if (count !== BigInt(body.length - MessageSize.DMA_ACCESS_FIXED)) {
    throw fail.inval(`${what}: count ${count} but ${body.length - MessageSize.DMA_ACCESS_FIXED} data bytes`).with({ rule: "count-mismatch", offset: 8 });
  }
  return { address: readU64(view, 0), count, data: asBuffer(body).subarray(MessageSize.DMA_ACCESS_FIXED) };
}

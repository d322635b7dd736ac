/**
 * VFIO_USER_DMA_READ (spec: "VFIO_USER_DMA_READ"), sent by the server to
 * read client memory that was mapped without an fd.
 *
 * Request (16 bytes):        Reply:
 *   0  address u64             0  address u64
 *   8  count   u64             8  count   u64
 *                             16  data    `count` bytes
 *
 * Note: QEMU's client (hw/vfio-user/pci.c, VFIOUserDMARW) lays the reply out
 * as address u64, count u32, data at offset 12. Such a reply fails the
 * count/length check below unless its first 4 data bytes happen to be 0.
 */
import { MessageSize } from "../constants.ts";
import { fail } from "../errors.ts";
import { readU64 } from "../u64.ts";
import { allocBody, asBuffer, checkCount, joinParts, needAtLeast, needExactly, putU64, viewOf } from "../wire.ts";

/** Server -> client: read `count` bytes at DMA address `address`. */
export interface DmaReadRequest {
  /** Client DMA address, inside a region mapped with DMA_MAP. */
  address: bigint;
  /** Bytes to read; at most the client's max_data_xfer_size. */
  count: bigint;
}

/** Client -> server. */
export interface DmaReadReply {
  /** Client DMA address accessed. */
  address: bigint;
  /** Bytes transferred; equals data.length. */
  count: bigint;
  /** The bytes read (decoded: a view aliasing the body). */
  data: Uint8Array;
}

function encodeAccess(address: bigint, count: bigint): Buffer {
  const { buf, view } = allocBody(MessageSize.DMA_ACCESS_FIXED);
  putU64(view, 0, address);
  putU64(view, 8, count);
  return buf;
}

export function encodeDmaReadRequest(msg: DmaReadRequest): Buffer {
  return encodeAccess(msg.address, msg.count);
}

export function decodeDmaReadRequest(body: Uint8Array): DmaReadRequest {
  needExactly(body, MessageSize.DMA_ACCESS_FIXED, "DMA_READ");
  const view = viewOf(body);
  return { address: readU64(view, 0), count: readU64(view, 8) };
}

/** The reply as [fixed part, data]; data is referenced, not cloned. */
export function encodeDmaReadReplyParts(msg: DmaReadReply): Uint8Array[] {
  checkCount(msg.count, msg.data.length, "DMA_READ reply");
  return [encodeAccess(msg.address, msg.count), msg.data];
}

export function encodeDmaReadReply(msg: DmaReadReply): Buffer {
  return joinParts(encodeDmaReadReplyParts(msg));
}

/** EINVAL when the body is short or its data length differs from count. The data aliases `body`. */
export function decodeDmaReadReply(body: Uint8Array): DmaReadReply {
  const what = "DMA_READ reply";
  needAtLeast(body, MessageSize.DMA_ACCESS_FIXED, what);
  const view = viewOf(body);
  const count = readU64(view, 8);
  if (count !== BigInt(body.length - MessageSize.DMA_ACCESS_FIXED)) {
    throw fail.inval(`${what}: count ${count} but ${body.length - MessageSize.DMA_ACCESS_FIXED} data bytes`);
  }
  return { address: readU64(view, 0), count, data: asBuffer(body).subarray(MessageSize.DMA_ACCESS_FIXED) };
}

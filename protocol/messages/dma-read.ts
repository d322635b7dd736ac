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
import { decodeDmaAccessWithData, encodeDmaAccess } from "./access.ts";
import { readU64 } from "../u64.ts";
import { checkCount, joinParts, needExactly, viewOf } from "../wire.ts";

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

export function encodeDmaReadRequest(msg: DmaReadRequest): Buffer {
  return encodeDmaAccess(msg.address, msg.count);
}

export function decodeDmaReadRequest(body: Uint8Array): DmaReadRequest {
  needExactly(body, MessageSize.DMA_ACCESS_FIXED, "DMA_READ");
  const view = viewOf(body);
  return { address: readU64(view, 0), count: readU64(view, 8) };
}

/** The reply as [fixed part, data]; data is referenced, not cloned. */
export function encodeDmaReadReplyParts(msg: DmaReadReply): Uint8Array[] {
  checkCount(msg.count, msg.data.length, "DMA_READ reply");
  return [encodeDmaAccess(msg.address, msg.count), msg.data];
}

export function encodeDmaReadReply(msg: DmaReadReply): Buffer {
  return joinParts(encodeDmaReadReplyParts(msg));
}

/** EINVAL when the body is short or its data length differs from count. The data aliases `body`. */
export function decodeDmaReadReply(body: Uint8Array): DmaReadReply {
  return decodeDmaAccessWithData(body, "DMA_READ reply");
}

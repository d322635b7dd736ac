/**
 * VFIO_USER_DMA_WRITE (spec: "VFIO_USER_DMA_WRITE"), sent by the server to
 * write client memory that was mapped without an fd.
 *
 * Request:                   Reply (12 bytes per the spec's table):
 *   0  address u64             0  address u64
 *   8  count   u64             8  count   u32
 *  16  data    `count` bytes
 *
 * Peers disagree on the reply: QEMU's client answers with a bare header
 * (empty body) and libvfio-user's struct has a u64 count (16 bytes). The
 * decoder accepts all three; the encoder writes the spec's 12 bytes.
 */
import { MessageSize } from "../constants.ts";
import { decodeDmaAccessWithData, encodeDmaAccess } from "./access.ts";
import { fail } from "../errors.ts";
import { readU64 } from "../u64.ts";
import { allocBody, checkCount, joinParts, needAtLeast, putU32, putU64, viewOf } from "../wire.ts";

/** Server -> client: write `data` at DMA address `address`. */
export interface DmaWriteRequest {
  /** Client DMA address, inside a region mapped with DMA_MAP. */
  address: bigint;
  /** Bytes to write; equals data.length. */
  count: bigint;
  /** The bytes (decoded: a view aliasing the body). */
  data: Uint8Array;
}

/** Client -> server. Both fields are absent when the client acked with an empty body (QEMU). */
export interface DmaWriteReply {
  /** Client DMA address accessed. */
  address?: bigint;
  /** Bytes transferred. */
  count?: number;
}

/** The request as [fixed part, data]; data is referenced, not cloned. */
export function encodeDmaWriteRequestParts(msg: DmaWriteRequest): Uint8Array[] {
  checkCount(msg.count, msg.data.length, "DMA_WRITE");
  return [encodeDmaAccess(msg.address, msg.count), msg.data];
}

export function encodeDmaWriteRequest(msg: DmaWriteRequest): Buffer {
  return joinParts(encodeDmaWriteRequestParts(msg));
}

/** EINVAL when the body is short or its data length differs from count. The data aliases `body`. */
export function decodeDmaWriteRequest(body: Uint8Array): DmaWriteRequest {
  return decodeDmaAccessWithData(body, "DMA_WRITE");
}

/** Encodes the spec's 12-byte reply; an empty object encodes to an empty body. */
export function encodeDmaWriteReply(msg: DmaWriteReply): Buffer {
  if (msg.address === undefined && msg.count === undefined) return Buffer.alloc(0);
  if (msg.address === undefined || msg.count === undefined) {
    throw new RangeError("DMA_WRITE reply: address and count go together");
  }
  const { buf, view } = allocBody(MessageSize.DMA_WRITE_REPLY);
  putU64(view, 0, msg.address);
  putU32(view, 8, msg.count, "count");
  return buf;
}

/**
 * Decodes a reply of 0 bytes (QEMU), 12 bytes (spec) or 16 bytes (u64
 * count, libvfio-user; the count must fit 32 bits). Anything else: EINVAL.
 */
export function decodeDmaWriteReply(body: Uint8Array): DmaWriteReply {
  const what = "DMA_WRITE reply";
  if (body.length === 0) return {};
  needAtLeast(body, MessageSize.DMA_WRITE_REPLY, what);
  const view = viewOf(body);
  const address = readU64(view, 0);
  if (body.length === MessageSize.DMA_WRITE_REPLY) return { address, count: view.getUint32(8, true) };
  if (body.length === MessageSize.DMA_ACCESS_FIXED) {
    if (view.getUint32(12, true) !== 0) throw fail.inval(`${what}: count does not fit 32 bits`);
    return { address, count: view.getUint32(8, true) };
  }
  throw fail.inval(`${what}: unexpected body of ${body.length} bytes`);
}

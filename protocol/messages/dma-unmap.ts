/**
 * VFIO_USER_DMA_UNMAP (spec: "VFIO_USER_DMA_UNMAP").
 *
 * Request and reply (24 bytes):
 *   0  argsz   u32  request: maximum reply payload size
 *   4  flags   u32  unused by the spec; QEMU sends VFIO_DMA_UNMAP_FLAG_ALL
 *   8  address u64  must match a previous mapping exactly
 *  16  size    u64
 *
 * spec: "The server responds with the original DMA entry in the request."
 */
import { DmaUnmapFlags, MessageSize } from "../constants.ts";
import { fail } from "../errors.ts";
import { readU64 } from "../u64.ts";
import { allocBody, needArgsz, needExactly, putU32, putU64, viewOf } from "../wire.ts";

/** Client -> server: the region [address, address + size) is no longer available. */
export interface DmaUnmapRequest {
  /** Maximum size of the reply payload; at least 24. */
  argsz: number;
  /** 0, or `DmaUnmapFlags.ALL` with address and size 0. */
  flags: number;
  /** Base DMA address of a previous mapping. */
  address: bigint;
  /** Size of that mapping. */
  size: bigint;
}

/** Server -> client: the request's entry, echoed. */
export type DmaUnmapReply = DmaUnmapRequest;

function encodeEntry(msg: DmaUnmapRequest): Buffer {
  const { buf, view } = allocBody(MessageSize.DMA_UNMAP);
  putU32(view, 0, msg.argsz, "argsz");
  putU32(view, 4, msg.flags, "flags");
  putU64(view, 8, msg.address);
  putU64(view, 16, msg.size);
  return buf;
}

function decodeEntry(body: Uint8Array, what: string): DmaUnmapRequest {
  needExactly(body, MessageSize.DMA_UNMAP, what);
  const view = viewOf(body);
  return {
    argsz: view.getUint32(0, true),
    flags: view.getUint32(4, true),
    address: readU64(view, 8),
    size: readU64(view, 16),
  };
}

export const encodeDmaUnmapRequest = encodeEntry;
export const encodeDmaUnmapReply = encodeEntry;

/**
 * Decodes a DMA_UNMAP request. EINVAL when the body is not 24 bytes, argsz
 * cannot hold the 24-byte reply, flags carry anything but ALL, or ALL comes
 * with a non-zero address or size (vfio.h rule for VFIO_DMA_UNMAP_FLAG_ALL).
 */
export function decodeDmaUnmapRequest(body: Uint8Array): DmaUnmapRequest {
  const msg = decodeEntry(body, "DMA_UNMAP");
  // spec: "argsz is the maximum size of the reply payload"; the reply echoes the 24-byte entry
  needArgsz(msg.argsz, MessageSize.DMA_UNMAP, "DMA_UNMAP");
  // spec: "flags is unused in this version"; only vfio.h's ALL is tolerated (QEMU sends it)
  if ((msg.flags & ~DmaUnmapFlags.ALL) !== 0) {
    throw fail.inval(`DMA_UNMAP: unknown flags 0x${msg.flags.toString(16)}`).with({ rule: "undefined-flags", offset: 4 });
  }
  if ((msg.flags & DmaUnmapFlags.ALL) !== 0 && (msg.address !== 0n || msg.size !== 0n)) {
    throw fail.inval("DMA_UNMAP: FLAG_ALL needs address and size 0");
  }
  return msg;
}

export function decodeDmaUnmapReply(body: Uint8Array): DmaUnmapReply {
  return decodeEntry(body, "DMA_UNMAP reply");
}

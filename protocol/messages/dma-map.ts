/**
 * VFIO_USER_DMA_MAP (spec: "VFIO_USER_DMA_MAP").
 *
 * Request (32 bytes):
 *   0  argsz   u32  size of this structure (no reply payload)
 *   4  flags   u32  bit 0 readable, bit 1 writeable
 *   8  offset  u64  file offset of the region in the fd sent with the message, or 0
 *  16  address u64  base DMA address
 *  24  size    u64
 *
 * Reply: no payload. The fd, if any, travels as ancillary data.
 */
import { DmaMapFlags, MessageSize } from "../constants.ts";
import { fail } from "../errors.ts";
import { readU64 } from "../u64.ts";
import { allocBody, needArgsz, needExactly, putU32, putU64, viewOf } from "../wire.ts";

const KNOWN_FLAGS = DmaMapFlags.READ | DmaMapFlags.WRITE;

/** Client -> server: the server may access [address, address + size). */
export interface DmaMapRequest {
  /** Size of the structure, 32. */
  argsz: number;
  /** `DmaMapFlags.READ` / `WRITE`. */
  flags: number;
  /** Offset of the region within the fd passed with the message; 0 when not mappable. */
  offset: bigint;
  /** Base DMA address (IOVA) of the region. */
  address: bigint;
  /** Size of the region in bytes. */
  size: bigint;
}

/** Server -> client: no payload. */
export type DmaMapReply = Record<string, never>;

export function encodeDmaMapRequest(msg: DmaMapRequest): Buffer {
  const { buf, view } = allocBody(MessageSize.DMA_MAP);
  putU32(view, 0, msg.argsz, "argsz");
  putU32(view, 4, msg.flags, "flags");
  putU64(view, 8, msg.offset);
  putU64(view, 16, msg.address);
  putU64(view, 24, msg.size);
  return buf;
}

/**
 * Decodes a DMA_MAP request. EINVAL when the body is not 32 bytes, argsz
 * is below 32, or flags carry bits other than READ/WRITE.
 */
export function decodeDmaMapRequest(body: Uint8Array): DmaMapRequest {
  // spec: "This structure is 32 bytes in size, so the message size is 16 + 32 bytes."
  needExactly(body, MessageSize.DMA_MAP, "DMA_MAP");
  const view = viewOf(body);
  const argsz = view.getUint32(0, true);
  // spec: "argsz is the size of the above structure"
  needArgsz(argsz, MessageSize.DMA_MAP, "DMA_MAP");
  const flags = view.getUint32(4, true);
  if ((flags & ~KNOWN_FLAGS) !== 0) throw fail.inval(`DMA_MAP: unknown flags 0x${flags.toString(16)}`).with({ rule: "undefined-flags", offset: 4 });
  return {
    argsz,
    flags,
    offset: readU64(view, 8),
    address: readU64(view, 16),
    size: readU64(view, 24),
  };
}

export function encodeDmaMapReply(_msg: DmaMapReply = {}): Buffer {
  return Buffer.alloc(0);
}

/** spec: "There is no payload in the reply message." */
export function decodeDmaMapReply(body: Uint8Array): DmaMapReply {
  needExactly(body, 0, "DMA_MAP reply");
  return {};
}

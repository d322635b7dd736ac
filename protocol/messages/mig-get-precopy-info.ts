/**
 * VFIO_USER_MIG_GET_PRECOPY_INFO, command 19: an EXTENSION of this project,
 * not in the vfio-user spec. It carries vfio.h's VFIO_MIG_GET_PRECOPY_INFO
 * ioctl (struct vfio_precopy_info) over the socket, since vfio-user has no
 * data_fd to issue it on. Only valid in PRE_COPY states (the handler's rule).
 *
 *   request, two accepted shapes:
 *     8 bytes:     argsz u32 (>= 24, room for the reply), flags u32 (0)
 *     24 bytes:    struct vfio_precopy_info as a whole (argsz, flags,
 *                  initial_bytes, dirty_bytes), the shape QEMU's migration
 *                  prototype sends (eltrufas/qemu, hw/vfio-user/device.c):
 *                  all zero, argsz included. argsz 0 is read as the
 *                  struct's size (24); initial_bytes and dirty_bytes of a
 *                  request carry nothing and are ignored.
 *   reply (24):    argsz u32 (24), flags u32 (0), initial_bytes u64, dirty_bytes u64
 */
import { MessageSize } from "../constants.ts";
import { readU64 } from "../u64.ts";
import { allocBody, needArgsz, needExactly, needZero, putU32, putU64, viewOf } from "../wire.ts";

/** Client -> server (extension). */
export interface MigGetPrecopyInfoRequest {
  /** Maximum size of the reply payload; at least 24. */
  argsz: number;
  /** No flags are defined; must be 0. */
  flags: number;
}

/** Server -> client (extension): struct vfio_precopy_info. */
export interface MigGetPrecopyInfoReply {
  /** Size of the reply payload, 24. */
  argsz: number;
  /** No flags are defined; 0. */
  flags: number;
  /** Initial precopy data still available; should reach 0 before STOP_COPY. */
  initial_bytes: bigint;
  /** Data describing state changed since it was last read. */
  dirty_bytes: bigint;
}

export function encodeMigGetPrecopyInfoRequest(msg: MigGetPrecopyInfoRequest): Buffer {
  const { buf, view } = allocBody(MessageSize.PRECOPY_INFO_REQUEST);
  putU32(view, 0, msg.argsz, "argsz");
  putU32(view, 4, msg.flags, "flags");
  return buf;
}

/**
 * EINVAL unless the body is 8 bytes (argsz >= 24) or 24 bytes (argsz 0,
 * read as 24, or >= 24), and flags is 0.
 */
export function decodeMigGetPrecopyInfoRequest(body: Uint8Array): MigGetPrecopyInfoRequest {
  const what = "MIG_GET_PRECOPY_INFO";
  if (body.length !== MessageSize.PRECOPY_INFO) needExactly(body, MessageSize.PRECOPY_INFO_REQUEST, what);
  const view = viewOf(body);
  let argsz = view.getUint32(0, true);
  const flags = view.getUint32(4, true);
  // the whole-struct shape: a client that never set argsz means the struct itself
  if (body.length === MessageSize.PRECOPY_INFO && argsz === 0) argsz = MessageSize.PRECOPY_INFO;
  needArgsz(argsz, MessageSize.PRECOPY_INFO, what);
  needZero(flags, "flags", what, 4);
  return { argsz, flags };
}

/**
 * True for the 24-byte request shape with argsz 0, the one the decoder reads
 * as 24 (the client never set argsz). A fact about what was accepted.
 */
export function precopyInfoArgszOmitted(body: Uint8Array): boolean {
  return body.length === MessageSize.PRECOPY_INFO && viewOf(body).getUint32(0, true) === 0;
}

export function encodeMigGetPrecopyInfoReply(msg: MigGetPrecopyInfoReply): Buffer {
  const { buf, view } = allocBody(MessageSize.PRECOPY_INFO);
  putU32(view, 0, msg.argsz, "argsz");
  putU32(view, 4, msg.flags, "flags");
  putU64(view, 8, msg.initial_bytes);
  putU64(view, 16, msg.dirty_bytes);
  return buf;
}

export function decodeMigGetPrecopyInfoReply(body: Uint8Array): MigGetPrecopyInfoReply {
  needExactly(body, MessageSize.PRECOPY_INFO, "MIG_GET_PRECOPY_INFO reply");
  const view = viewOf(body);
  return {
    argsz: view.getUint32(0, true),
    flags: view.getUint32(4, true),
    initial_bytes: readU64(view, 8),
    dirty_bytes: readU64(view, 16),
  };
}

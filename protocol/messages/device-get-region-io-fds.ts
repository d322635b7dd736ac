/**
 * VFIO_USER_DEVICE_GET_REGION_IO_FDS (spec: "VFIO_USER_DEVICE_GET_REGION_IO_FDS").
 *
 * Request (16 bytes) and reply fixed part:
 *   0  argsz u32
 *   4  flags u32  must be zero
 *   8  index u32  region queried
 *  12  count u32  request: must be zero; reply: number of sub-regions
 *
 * The reply continues with `count` 40-byte sub-region entries:
 *   0  offset    u64
 *   8  size      u64
 *  16  fd_index  u32  index into the reply's fd array
 *  20  type      u32  VFIO_USER_IO_FD_TYPE_IOEVENTFD (0) / _IOREGIONFD (1)
 *  24  flags     u32  KVM_IOEVENTFD_FLAG_* / KVM_IOREGION_*
 *  28  padding   u32
 *  32  datamatch (ioeventfd) or user_data (ioregionfd) u64
 */
import { IoFdType, MessageSize } from "../constants.ts";
import { fail } from "../errors.ts";
import { readU64 } from "../u64.ts";
import { allocBody, needArgsz, needAtLeast, needExactly, needZero, putU32, putU64, viewOf } from "../wire.ts";

/** Client -> server. */
export interface DeviceGetRegionIoFdsRequest {
  /** Maximum size of the reply payload; at least 16. */
  argsz: number;
  /** Region queried. */
  index: number;
}

interface SubRegionBase {
  /** Start of the sub-region within the region. */
  offset: bigint;
  /** Length of the sub-region; may be 0 when the access size does not matter. */
  size: bigint;
  /** Index of the fd in the reply's ancillary data (fds may be shared). */
  fd_index: number;
  /** KVM flags for the chosen mechanism. */
  flags: number;
}

/** A sub-region to be wired up as a KVM ioeventfd. */
export interface IoeventfdSubRegion extends SubRegionBase {
  type: typeof IoFdType.IOEVENTFD;
  /** Value to match when KVM_IOEVENTFD_FLAG_DATAMATCH is set. */
  datamatch: bigint;
}

/** A sub-region to be wired up as a KVM ioregionfd. */
export interface IoregionfdSubRegion extends SubRegionBase {
  type: typeof IoFdType.IOREGIONFD;
  /** Opaque value passed back to the server on the fd. */
  user_data: bigint;
}

export type SubRegionIoFd = IoeventfdSubRegion | IoregionfdSubRegion;

/** Server -> client. */
export interface DeviceGetRegionIoFdsReply {
  /** Size of the full reply: 16 + 40 x count. */
  argsz: number;
  /** Must be zero. */
  flags: number;
  /** Region queried. */
  index: number;
  /** Number of sub-regions (also when the array was left out for a short argsz). */
  count: number;
  /** The sub-regions; empty when the reply carries only the fixed part. */
  sub_regions: SubRegionIoFd[];
}

export function encodeDeviceGetRegionIoFdsRequest(msg: DeviceGetRegionIoFdsRequest): Buffer {
  const { buf, view } = allocBody(MessageSize.REGION_IO_FDS_FIXED);
  putU32(view, 0, msg.argsz, "argsz");
  putU32(view, 8, msg.index, "index");
  return buf;
}

/** EINVAL when the body is not 16 bytes, argsz < 16, or flags/count are non-zero. */
export function decodeDeviceGetRegionIoFdsRequest(body: Uint8Array): DeviceGetRegionIoFdsRequest {
  const what = "DEVICE_GET_REGION_IO_FDS";
  needExactly(body, MessageSize.REGION_IO_FDS_FIXED, what);
  const view = viewOf(body);
  const argsz = view.getUint32(0, true);
  needArgsz(argsz, MessageSize.REGION_IO_FDS_FIXED, what);
  // spec: "The client must set flags to zero"; "all other fields must be zero"
  needZero(view.getUint32(4, true), "flags", what, 4);
  needZero(view.getUint32(12, true), "count", what, 12);
  return { argsz, index: view.getUint32(8, true) };
}

/** The reply's full argsz for `count` sub-regions. */
export function regionIoFdsArgsz(count: number): number {
  return MessageSize.REGION_IO_FDS_FIXED + count * MessageSize.SUB_REGION_IO_FD;
}

/**
 * Encodes the reply. `sub_regions` may be empty while `count` is not (the
 * short form for a client argsz too small for the array); otherwise count
 * must equal the array length (RangeError).
 */
export function encodeDeviceGetRegionIoFdsReply(msg: DeviceGetRegionIoFdsReply): Buffer {
  if (msg.sub_regions.length !== 0 && msg.sub_regions.length !== msg.count) {
    throw new RangeError(`region io fds: count ${msg.count} but ${msg.sub_regions.length} sub-regions`);
  }
  const { buf, view } = allocBody(regionIoFdsArgsz(msg.sub_regions.length));
  putU32(view, 0, msg.argsz, "argsz");
  putU32(view, 4, msg.flags, "flags");
  putU32(view, 8, msg.index, "index");
  putU32(view, 12, msg.count, "count");
  let p = MessageSize.REGION_IO_FDS_FIXED;
  for (const sr of msg.sub_regions) {
    putU64(view, p, sr.offset);
    putU64(view, p + 8, sr.size);
    putU32(view, p + 16, sr.fd_index, "fd_index");
    putU32(view, p + 20, sr.type, "type");
    putU32(view, p + 24, sr.flags, "flags");
    putU64(view, p + 32, sr.type === IoFdType.IOEVENTFD ? sr.datamatch : sr.user_data);
    p += MessageSize.SUB_REGION_IO_FD;
  }
  return buf;
}

/**
 * Decodes a reply. A 16-byte body is the short form (no array); a longer one
 * must hold exactly `count` 40-byte entries. Unknown sub-region types: EINVAL.
 */
export function decodeDeviceGetRegionIoFdsReply(body: Uint8Array): DeviceGetRegionIoFdsReply {
  const what = "DEVICE_GET_REGION_IO_FDS reply";
  needAtLeast(body, MessageSize.REGION_IO_FDS_FIXED, what);
  const view = viewOf(body);
  const count = view.getUint32(12, true);
  const sub_regions: SubRegionIoFd[] = [];
  if (body.length > MessageSize.REGION_IO_FDS_FIXED) {
    // Entries are 40 bytes for both types today (the spec warns this may change).
    if (body.length !== regionIoFdsArgsz(count)) {
      throw fail.inval(`${what}: ${body.length} bytes do not hold ${count} sub-regions`);
    }
    for (let i = 0, p = MessageSize.REGION_IO_FDS_FIXED; i < count; i++, p += MessageSize.SUB_REGION_IO_FD) {
      const base = {
        offset: readU64(view, p),
        size: readU64(view, p + 8),
        fd_index: view.getUint32(p + 16, true),
        flags: view.getUint32(p + 24, true),
      };
      const type = view.getUint32(p + 20, true);
      const last = readU64(view, p + 32);
      if (type === IoFdType.IOEVENTFD) sub_regions.push({ ...base, type, datamatch: last });
      else if (type === IoFdType.IOREGIONFD) sub_regions.push({ ...base, type, user_data: last });
      else throw fail.inval(`${what}: unknown sub-region type ${type}`);
    }
  }
  return {
    argsz: view.getUint32(0, true),
    flags: view.getUint32(4, true),
    index: view.getUint32(8, true),
    count,
    sub_regions,
  };
}

/**
 * VFIO_USER_DEVICE_GET_REGION_INFO (spec: "VFIO_USER_DEVICE_GET_REGION_INFO").
 *
 * Request and reply fixed part (32 bytes, struct vfio_region_info):
 *   0  argsz      u32  request: maximum reply size; reply: size of the full reply
 *   4  flags      u32  VFIO_REGION_INFO_FLAG_READ / WRITE / MMAP / CAPS
 *   8  index      u32
 *  12  cap_offset u32  offset of the first capability from the start of this struct
 *  16  size       u64
 *  24  offset     u64  mmap offset for MMAP regions
 *
 * The reply may continue with a capability chain (spec: "VFIO region
 * capabilities"); each capability starts with struct vfio_info_cap_header
 * (id u16, version u16, next u32; next is relative to the struct start,
 * 0 ends the chain):
 *
 *   sparse mmap (id 1): header, nr_areas u32, reserved u32, nr_areas x {offset u64, size u64}
 *   type        (id 2): header, type u32, subtype u32
 *
 * When the full reply would exceed the client's argsz, only the fixed part is
 * sent, with argsz set to the size needed (spec: "Message sizes").
 */
import { MessageSize, RegionCapId, RegionCapVersion, RegionInfoFlags } from "../constants.ts";
import { fail } from "../errors.ts";
import { readU64 } from "../u64.ts";
import { allocBody, asBuffer, needArgsz, needAtLeast, needExactly, needZero, putU16, putU32, putU64, viewOf } from "../wire.ts";

/** Client -> server. Only argsz and index are set; the rest must be zero. */
export interface DeviceGetRegionInfoRequest {
  /** Maximum size of the reply payload; at least 32. */
  argsz: number;
  /** Region being queried. */
  index: number;
}

/** One mmap-able window of a region (struct vfio_region_sparse_mmap_area). */
export interface SparseMmapArea {
  /** Offset of the area within the region (added to the region's mmap offset). */
  offset: bigint;
  /** Size of the area. */
  size: bigint;
}

/** VFIO_REGION_INFO_CAP_SPARSE_MMAP: only these parts of the region may be mmap'ed. */
export interface SparseMmapCap {
  kind: "sparse_mmap";
  /** Capability version; 1 per the spec. */
  version: number;
  /** The areas; nr_areas on the wire is their count. */
  areas: SparseMmapArea[];
}

/** VFIO_REGION_INFO_CAP_TYPE: a device-specific region's type and subtype. */
export interface TypeCap {
  kind: "type";
  /** Capability version; 1 in vfio.h. */
  version: number;
  /** `RegionType.*`, global per bus driver. */
  type: number;
  /** Type-specific subtype. */
  subtype: number;
}

/** Any other capability, kept as bytes (the data after its 8-byte header, up to `next`). */
export interface RawRegionCap {
  kind: "raw";
  id: number;
  version: number;
  /** View into the decoded body (aliases it; copy to keep). */
  data: Uint8Array;
}

export type RegionInfoCap = SparseMmapCap | TypeCap | RawRegionCap;

/** Server -> client. */
export interface DeviceGetRegionInfoReply {
  /** Size of the full reply (fixed part plus capabilities), even when they were left out. */
  argsz: number;
  /** `RegionInfoFlags.*`; CAPS set when capabilities follow. */
  flags: number;
  /** Region queried. */
  index: number;
  /** Offset of the first capability from the struct start; 0 when none follow. */
  cap_offset: number;
  /** Region size. */
  size: bigint;
  /** Offset to give mmap() for MMAP regions; base of sparse areas. */
  offset: bigint;
  /** Capabilities in chain order; empty when the reply carries only the fixed part. */
  caps: RegionInfoCap[];
}

/** Region description from which `regionInfoReply` builds the reply. */
export interface RegionInfo {
  /** READ/WRITE/MMAP flags; CAPS is managed by `regionInfoReply`. */
  flags: number;
  index: number;
  size: bigint;
  offset: bigint;
  caps?: RegionInfoCap[];
}

export function encodeDeviceGetRegionInfoRequest(msg: DeviceGetRegionInfoRequest): Buffer {
  const { buf, view } = allocBody(MessageSize.REGION_INFO);
  putU32(view, 0, msg.argsz, "argsz");
  putU32(view, 8, msg.index, "index");
  return buf;
}

/** EINVAL when the body is not 32 bytes, argsz < 32, or a field other than argsz/index is non-zero. */
export function decodeDeviceGetRegionInfoRequest(body: Uint8Array): DeviceGetRegionInfoRequest {
  const what = "DEVICE_GET_REGION_INFO";
  needExactly(body, MessageSize.REGION_INFO, what);
  const view = viewOf(body);
  const argsz = view.getUint32(0, true);
  // spec: "argsz the maximum size of the reply payload", at least the fixed reply part
  needArgsz(argsz, MessageSize.REGION_INFO, what);
  // spec: "index ... is the only field that is required to be set"; "all other fields must be zero."
  needZero(view.getUint32(4, true), "flags", what, 4);
  needZero(view.getUint32(12, true), "cap_offset", what, 12);
  needZero(readU64(view, 16), "size", what, 16);
  needZero(readU64(view, 24), "offset", what, 24);
  return { argsz, index: view.getUint32(8, true) };
}

/** Bytes a capability takes on the wire, header included. */
export function regionCapSize(cap: RegionInfoCap): number {
  switch (cap.kind) {
    case "sparse_mmap":
      return MessageSize.SPARSE_MMAP_CAP_FIXED + cap.areas.length * MessageSize.SPARSE_MMAP_AREA;
    case "type":
      return MessageSize.TYPE_CAP;
    case "raw":
      return MessageSize.CAP_HEADER + cap.data.length;
  }
}

/** A sparse mmap capability with the spec's version. */
export function sparseMmapCap(areas: SparseMmapArea[]): SparseMmapCap {
  return { kind: "sparse_mmap", version: RegionCapVersion.SPARSE_MMAP, areas };
}

/** A type capability with vfio.h's version. */
export function typeCap(type: number, subtype: number): TypeCap {
  return { kind: "type", version: RegionCapVersion.TYPE, type, subtype };
}

/**
 * Builds the reply for a client whose request carried `clientArgsz`: argsz is
 * always the full size; capabilities (and the CAPS flag, cap_offset) are
 * included only if they fit. CAPS is left clear in the short form because
 * QEMU's client rejects CAPS with a cap_offset outside its buffer before it
 * retries with the larger argsz (libvfio-user does the same).
 */
export function regionInfoReply(info: RegionInfo, clientArgsz: number): DeviceGetRegionInfoReply {
  const caps = info.caps ?? [];
  let capsSize = 0;
  for (const cap of caps) capsSize += regionCapSize(cap);
  const argsz = MessageSize.REGION_INFO + capsSize;
  const fits = caps.length > 0 && clientArgsz >= argsz;
  return {
    argsz,
    // >>> 0: JS bit operators yield int32; keep flags a u32 when bit 31 is set
    flags: (fits ? info.flags | RegionInfoFlags.CAPS : info.flags & ~RegionInfoFlags.CAPS) >>> 0,
    index: info.index,
    cap_offset: fits ? MessageSize.REGION_INFO : 0,
    size: info.size,
    offset: info.offset,
    caps: fits ? caps : [],
  };
}

function writeCap(buf: Buffer, view: DataView, at: number, cap: RegionInfoCap, next: number): void {
  const id = cap.kind === "sparse_mmap" ? RegionCapId.SPARSE_MMAP : cap.kind === "type" ? RegionCapId.TYPE : cap.id;
  putU16(view, at, id, "cap id");
  putU16(view, at + 2, cap.version, "cap version");
  putU32(view, at + 4, next, "cap next");
  switch (cap.kind) {
    case "sparse_mmap": {
      putU32(view, at + 8, cap.areas.length, "nr_areas");
      let p = at + MessageSize.SPARSE_MMAP_CAP_FIXED;
      for (const area of cap.areas) {
        putU64(view, p, area.offset);
        putU64(view, p + 8, area.size);
        p += MessageSize.SPARSE_MMAP_AREA;
      }
      break;
    }
    case "type":
      putU32(view, at + 8, cap.type, "type");
      putU32(view, at + 12, cap.subtype, "subtype");
      break;
    case "raw":
      buf.set(cap.data, at + MessageSize.CAP_HEADER);
      break;
  }
}

/**
 * Encodes the reply as given (see `regionInfoReply` to derive argsz, flags
 * and cap_offset). Capabilities are laid out back to back from cap_offset,
 * next pointers computed. Throws RangeError when caps are given without the
 * CAPS flag or with a cap_offset inside the fixed part.
 */
export function encodeDeviceGetRegionInfoReply(msg: DeviceGetRegionInfoReply): Buffer {
  let capsSize = 0;
  for (const cap of msg.caps) capsSize += regionCapSize(cap);
  if (msg.caps.length > 0) {
    if ((msg.flags & RegionInfoFlags.CAPS) === 0) throw new RangeError("region info: caps given without the CAPS flag");
    if (msg.cap_offset < MessageSize.REGION_INFO) throw new RangeError(`region info: cap_offset ${msg.cap_offset} < 32`);
  }
  const length = msg.caps.length > 0 ? msg.cap_offset + capsSize : MessageSize.REGION_INFO;
  const { buf, view } = allocBody(length);
  putU32(view, 0, msg.argsz, "argsz");
  putU32(view, 4, msg.flags, "flags");
  putU32(view, 8, msg.index, "index");
  putU32(view, 12, msg.cap_offset, "cap_offset");
  putU64(view, 16, msg.size);
  putU64(view, 24, msg.offset);
  let at = msg.cap_offset;
  msg.caps.forEach((cap, i) => {
    const size = regionCapSize(cap);
    writeCap(buf, view, at, cap, i === msg.caps.length - 1 ? 0 : at + size);
    at += size;
  });
  return buf;
}

/**
 * Decodes a reply. Capabilities are parsed when CAPS is set and cap_offset is
 * non-zero; each must lie inside the body and `next` must move forward (so
 * the walk ends). EINVAL for a short body, argsz < 32 or a broken chain.
 * Bytes past the fixed part are ignored when no chain is announced (a peer
 * may pad the reply to the client's argsz).
 */
export function decodeDeviceGetRegionInfoReply(body: Uint8Array): DeviceGetRegionInfoReply {
  const what = "DEVICE_GET_REGION_INFO reply";
  needAtLeast(body, MessageSize.REGION_INFO, what);
  const buf = asBuffer(body);
  const view = viewOf(buf);
  const argsz = view.getUint32(0, true);
  needArgsz(argsz, MessageSize.REGION_INFO, what);
  const flags = view.getUint32(4, true);
  const capOffset = view.getUint32(12, true);
  const caps: RegionInfoCap[] = [];
  if ((flags & RegionInfoFlags.CAPS) !== 0 && capOffset !== 0) {
    let at = capOffset;
    while (at !== 0) {
      // spec: cap_offset / next are "relative to the beginning of the VFIO region info structure"
      if (at < MessageSize.REGION_INFO || at + MessageSize.CAP_HEADER > buf.length) {
        throw fail.inval(`${what}: capability at ${at} outside the body`);
      }
      const id = view.getUint16(at, true);
      const version = view.getUint16(at + 2, true);
      const next = view.getUint32(at + 4, true);
      if (next !== 0 && next < at + MessageSize.CAP_HEADER) {
        throw fail.inval(`${what}: capability next ${next} does not move past ${at}`);
      }
      const end = next === 0 ? buf.length : next;
      if (end > buf.length) throw fail.inval(`${what}: capability next ${next} outside the body`);
      caps.push(decodeCap(buf, view, at, end, id, version, what));
      at = next;
    }
  }
  return {
    argsz,
    flags,
    index: view.getUint32(8, true),
    cap_offset: capOffset,
    size: readU64(view, 16),
    offset: readU64(view, 24),
    caps,
  };
}

function decodeCap(buf: Buffer, view: DataView, at: number, end: number, id: number, version: number, what: string): RegionInfoCap {
  if (id === RegionCapId.SPARSE_MMAP) {
    if (end - at < MessageSize.SPARSE_MMAP_CAP_FIXED) throw fail.inval(`${what}: sparse mmap capability truncated`);
    const nr = view.getUint32(at + 8, true);
    if (nr > (end - at - MessageSize.SPARSE_MMAP_CAP_FIXED) / MessageSize.SPARSE_MMAP_AREA) {
      throw fail.inval(`${what}: nr_areas ${nr} does not fit the capability`);
    }
    const areas: SparseMmapArea[] = [];
    let p = at + MessageSize.SPARSE_MMAP_CAP_FIXED;
    for (let i = 0; i < nr; i++, p += MessageSize.SPARSE_MMAP_AREA) {
      areas.push({ offset: readU64(view, p), size: readU64(view, p + 8) });
    }
    return { kind: "sparse_mmap", version, areas };
  }
  if (id === RegionCapId.TYPE) {
    if (end - at < MessageSize.TYPE_CAP) throw fail.inval(`${what}: type capability truncated`);
    return { kind: "type", version, type: view.getUint32(at + 8, true), subtype: view.getUint32(at + 12, true) };
  }
  return { kind: "raw", id, version, data: buf.subarray(at + MessageSize.CAP_HEADER, end) };
}

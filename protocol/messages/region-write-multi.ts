/**
 * VFIO_USER_REGION_WRITE_MULTI (spec: "VFIO_USER_REGION_WRITE_MULTI"):
 * several small writes coalesced in one message.
 *
 * Request:                          each entry (24 bytes):
 *   0  wr_cnt u64                     0  offset u64
 *   8  wrs    wr_cnt entries          8  region u32
 *                                    12  count  u32  at most 8
 *                                    16  data   8 bytes, first `count` used
 *
 * Reply (8 bytes): wr_cnt u64, the number of writes completed.
 */
import { MessageSize, REGION_WRITE_MULTI_DATA, REGION_WRITE_MULTI_MAX } from "../constants.ts";
import { fail } from "../errors.ts";
import { readU64 } from "../u64.ts";
import { allocBody, asBuffer, needAtLeast, needExactly, putU32, putU64, viewOf } from "../wire.ts";

/** One coalesced write. */
export interface RegionWriteMultiEntry {
  /** Offset into the region. */
  offset: bigint;
  /** Region index. */
  region: number;
  /** The bytes to write, 0 to 8 of them; count on the wire is data.length (decoded: a view aliasing the body). */
  data: Uint8Array;
}

/** Client -> server. wr_cnt on the wire is wrs.length. */
export interface RegionWriteMultiRequest {
  /** The writes, in order. */
  wrs: RegionWriteMultiEntry[];
}

/** Server -> client. */
export interface RegionWriteMultiReply {
  /** Number of writes completed. */
  wr_cnt: bigint;
}

export function encodeRegionWriteMultiRequest(msg: RegionWriteMultiRequest): Buffer {
  if (msg.wrs.length > REGION_WRITE_MULTI_MAX) {
    throw new RangeError(`REGION_WRITE_MULTI: ${msg.wrs.length} writes, at most ${REGION_WRITE_MULTI_MAX}`);
  }
  const { buf, view } = allocBody(MessageSize.REGION_WRITE_MULTI_FIXED + msg.wrs.length * MessageSize.REGION_WRITE_MULTI_ENTRY);
  putU64(view, 0, BigInt(msg.wrs.length));
  let p = MessageSize.REGION_WRITE_MULTI_FIXED;
  for (const wr of msg.wrs) {
    if (wr.data.length > REGION_WRITE_MULTI_DATA) {
      throw new RangeError(`REGION_WRITE_MULTI: ${wr.data.length}-byte write, at most ${REGION_WRITE_MULTI_DATA}`);
    }
    putU64(view, p, wr.offset);
    putU32(view, p + 8, wr.region, "region");
    putU32(view, p + 12, wr.data.length, "count");
    buf.set(wr.data, p + 16);
    p += MessageSize.REGION_WRITE_MULTI_ENTRY;
  }
  return buf;
}

/**
 * Decodes the request. EINVAL when wr_cnt exceeds REGION_WRITE_MULTI_MAX,
 * the body does not hold exactly wr_cnt entries, or an entry's count
 * exceeds 8. Entry data aliases `body`.
 */
export function decodeRegionWriteMultiRequest(body: Uint8Array): RegionWriteMultiRequest {
  const what = "REGION_WRITE_MULTI";
  needAtLeast(body, MessageSize.REGION_WRITE_MULTI_FIXED, what);
  const buf = asBuffer(body);
  const view = viewOf(buf);
  const wrCnt = readU64(view, 0);
  // spec gives no limit; QEMU's client never sends more than VFIO_USER_MULTI_MAX
  if (wrCnt > BigInt(REGION_WRITE_MULTI_MAX)) throw fail.inval(`${what}: wr_cnt ${wrCnt} > ${REGION_WRITE_MULTI_MAX}`);
  const n = Number(wrCnt);
  if (body.length !== MessageSize.REGION_WRITE_MULTI_FIXED + n * MessageSize.REGION_WRITE_MULTI_ENTRY) {
    throw fail.inval(`${what}: ${body.length} bytes do not hold ${n} writes`);
  }
  const wrs: RegionWriteMultiEntry[] = new Array(n);
  for (let i = 0, p = MessageSize.REGION_WRITE_MULTI_FIXED; i < n; i++, p += MessageSize.REGION_WRITE_MULTI_ENTRY) {
    const count = view.getUint32(p + 12, true);
    // spec: "This format can only describe writes of 8 bytes or less."
    if (count > REGION_WRITE_MULTI_DATA) throw fail.inval(`${what}: write ${i} has count ${count} > 8`);
    wrs[i] = { offset: readU64(view, p), region: view.getUint32(p + 8, true), data: buf.subarray(p + 16, p + 16 + count) };
  }
  return { wrs };
}

export function encodeRegionWriteMultiReply(msg: RegionWriteMultiReply): Buffer {
  const { buf, view } = allocBody(MessageSize.REGION_WRITE_MULTI_REPLY);
  putU64(view, 0, msg.wr_cnt);
  return buf;
}

export function decodeRegionWriteMultiReply(body: Uint8Array): RegionWriteMultiReply {
  needExactly(body, MessageSize.REGION_WRITE_MULTI_REPLY, "REGION_WRITE_MULTI reply");
  return { wr_cnt: readU64(viewOf(body), 0) };
}

/**
 * REGION_READ / REGION_WRITE / REGION_WRITE_MULTI: guest accesses to config space and BARs.
 *
 * READ and WRITE are the hot path (every guest MMIO access that is not
 * mmap'd), so they read the 16-byte fixed part straight off the body and
 * allocate nothing of their own:
 * - the reply's fixed part (offset, region, count) is the request's, byte
 *   for byte, so the reply references the request body instead of encoding
 *   it again (the body is valid until the reply is sent, and the connection
 *   copies small replies into its own buffer anyway);
 * - a REGION_WRITE with No_reply builds no reply at all.
 * Any body the fast path does not accept goes to the message codecs, which
 * throw exactly the errors they always did.
 */
import { HeaderFlags, MessageSize } from "../../../protocol/constants.ts";
import { fail } from "../../../protocol/errors.ts";
import { decodeRegionReadRequest, encodeRegionReadReplyParts } from "../../../protocol/messages/region-read.ts";
import { decodeRegionWriteRequest } from "../../../protocol/messages/region-write.ts";
import { decodeRegionWriteMultiRequest, encodeRegionWriteMultiReply } from "../../../protocol/messages/region-write-multi.ts";
import { asBuffer } from "../../../protocol/wire.ts";
import { EMPTY_REPLY, reply, type Reply, type Request } from "../dispatcher.ts";

const FIXED = MessageSize.REGION_ACCESS_FIXED;

function checkCount(req: Request, count: number): void {
  if (count > req.session.maxDataXferSize) {
    throw fail.inval(`access of ${count} bytes exceeds max_data_xfer_size ${req.session.maxDataXferSize}`);
  }
}

export function handleRegionRead(req: Request): Reply {
  const body = req.body;
  if (body.length !== FIXED) {
    const r = decodeRegionReadRequest(body); // throws EINVAL for this body
    return readReply(req, r.offset, r.region, r.count, null);
  }
  return readReply(req, body.readBigUInt64LE(0), body.readUInt32LE(8), body.readUInt32LE(12), body);
}

function readReply(req: Request, offset: bigint, region: number, count: number, fixed: Buffer | null): Reply {
  checkCount(req, count);
  const data = req.endpoint.regionRead(region, offset, count);
  if (fixed !== null && data.length === count) return { parts: [fixed, data] };
  return { parts: encodeRegionReadReplyParts({ offset, region, count, data }) };
}

export function handleRegionWrite(req: Request): Reply {
  const body = req.body;
  if (body.length < FIXED || body.length - FIXED !== body.readUInt32LE(12)) {
    decodeRegionWriteRequest(body); // throws EINVAL for this body
  }
  const count = body.length - FIXED;
  checkCount(req, count);
  const region = body.readUInt32LE(8);
  const offset = body.readBigUInt64LE(0);
  req.endpoint.regionWrite(region, offset, body.subarray(FIXED));
  // a posted write's reply would be dropped by the connection: do not build it
  if ((req.header.flags & HeaderFlags.NO_REPLY) !== 0) return EMPTY_REPLY;
  return { parts: [body.subarray(0, FIXED)] };
}

export function handleRegionWriteMulti(req: Request): Reply {
  const m = decodeRegionWriteMultiRequest(req.body);
  // spec: the writes are applied in order; the first failure fails the message
  for (const w of m.wrs) req.endpoint.regionWrite(w.region, w.offset, asBuffer(w.data));
  return reply(encodeRegionWriteMultiReply({ wr_cnt: BigInt(m.wrs.length) }));
}

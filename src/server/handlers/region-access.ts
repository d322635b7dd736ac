/** REGION_READ / REGION_WRITE / REGION_WRITE_MULTI: guest accesses to config space and BARs. */
import { fail } from "../../../protocol/errors.ts";
import { decodeRegionReadRequest, encodeRegionReadReplyParts } from "../../../protocol/messages/region-read.ts";
import { decodeRegionWriteRequest, encodeRegionWriteReply } from "../../../protocol/messages/region-write.ts";
import { decodeRegionWriteMultiRequest, encodeRegionWriteMultiReply } from "../../../protocol/messages/region-write-multi.ts";
import { asBuffer } from "../../../protocol/wire.ts";
import { reply, type Reply, type Request } from "../dispatcher.ts";

function checkCount(req: Request, count: number): void {
  if (count > req.session.maxDataXferSize) {
    throw fail.inval(`access of ${count} bytes exceeds max_data_xfer_size ${req.session.maxDataXferSize}`);
  }
}

export function handleRegionRead(req: Request): Reply {
  const r = decodeRegionReadRequest(req.body);
  checkCount(req, r.count);
  const data = req.endpoint.regionRead(r.region, r.offset, r.count);
  return { parts: encodeRegionReadReplyParts({ offset: r.offset, region: r.region, count: r.count, data }) };
}

export function handleRegionWrite(req: Request): Reply {
  const w = decodeRegionWriteRequest(req.body);
  checkCount(req, w.count);
  req.endpoint.regionWrite(w.region, w.offset, asBuffer(w.data));
  return reply(encodeRegionWriteReply({ offset: w.offset, region: w.region, count: w.count }));
}

export function handleRegionWriteMulti(req: Request): Reply {
  const m = decodeRegionWriteMultiRequest(req.body);
  // spec: the writes are applied in order; the first failure fails the message
  for (const w of m.wrs) req.endpoint.regionWrite(w.region, w.offset, asBuffer(w.data));
  return reply(encodeRegionWriteMultiReply({ wr_cnt: BigInt(m.wrs.length) }));
}

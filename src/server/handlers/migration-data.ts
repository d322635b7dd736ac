/**
 * MIG_DATA_READ / MIG_DATA_WRITE (spec: the migration data stream moves
 * in-band) and this project's extension MIG_GET_PRECOPY_INFO (command 19,
 * the socket form of VFIO_MIG_GET_PRECOPY_INFO). Which states allow each is
 * checked by command-rules.ts before these run.
 */
import { fail } from "../../../protocol/errors.ts";
import { decodeMigDataReadRequest, decodeMigDataWriteRequest, encodeMigDataReadReplyParts, encodeMigDataWriteReply } from "../../../protocol/messages/mig-data.ts";
import { decodeMigGetPrecopyInfoRequest, encodeMigGetPrecopyInfoReply } from "../../../protocol/messages/mig-get-precopy-info.ts";
import { reply, type Reply, type Request } from "../dispatcher.ts";

export function handleMigDataRead(req: Request): Reply {
  const r = decodeMigDataReadRequest(req.body);
  // spec: sizes are bounded by max_data_xfer_size
  if (r.size > req.session.maxDataXferSize) throw fail.inval(`MIG_DATA_READ of ${r.size} bytes exceeds max_data_xfer_size ${req.session.maxDataXferSize}`);
  if (r.argsz < 8 + r.size) throw fail.inval(`MIG_DATA_READ argsz ${r.argsz} cannot hold ${r.size} bytes`);
  const segments = req.endpoint.migration.read(r.size);
  const data = segments.length === 1 ? segments[0]! : Buffer.concat(segments);
  return { parts: encodeMigDataReadReplyParts({ argsz: 8 + data.length, size: data.length, data }) };
}

export function handleMigDataWrite(req: Request): Reply {
  const w = decodeMigDataWriteRequest(req.body);
  if (w.size > req.session.maxDataXferSize) throw fail.inval(`MIG_DATA_WRITE of ${w.size} bytes exceeds max_data_xfer_size`);
  req.endpoint.migration.write(w.data);
  return reply(encodeMigDataWriteReply());
}

export function handleMigGetPrecopyInfo(req: Request): Reply {
  decodeMigGetPrecopyInfoRequest(req.body);
  const info = req.endpoint.migration.precopyInfo();
  return reply(encodeMigGetPrecopyInfoReply({ argsz: 24, flags: 0, initial_bytes: info.initialBytes, dirty_bytes: info.dirtyBytes }));
}

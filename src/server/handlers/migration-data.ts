/**
 * MIG_DATA_READ / MIG_DATA_WRITE (spec: the migration data stream moves
 * in-band) and this project's extension MIG_GET_PRECOPY_INFO (command 19,
 * the socket form of VFIO_MIG_GET_PRECOPY_INFO). Which states allow each is
 * checked by command-rules.ts before these run.
 */
import { MessageSize, MigState } from "../../../protocol/constants.ts";
import { fail } from "../../../protocol/errors.ts";
import { decodeMigDataReadRequest, decodeMigDataWriteRequest, encodeMigDataReadReplyParts, encodeMigDataWriteReply } from "../../../protocol/messages/mig-data.ts";
import { decodeMigGetPrecopyInfoRequest, encodeMigGetPrecopyInfoReply, precopyInfoArgszOmitted } from "../../../protocol/messages/mig-get-precopy-info.ts";
import { allocBody, putU32 } from "../../../protocol/wire.ts";
import { reply, type Reply, type Request } from "../dispatcher.ts";

/**
 * Above this many segments (many small records: scattered dirty pages) a
 * reply is joined into one buffer: one sendmsg takes at most 64 iovecs
 * (vfio_native.c), and the transport would copy the rest anyway.
 */
const MAX_REPLY_SEGMENTS = 48;

export function handleMigDataRead(req: Request): Reply {
  const r = decodeMigDataReadRequest(req.body);
  // spec: sizes are bounded by max_data_xfer_size
  if (r.size > req.session.maxDataXferSize) throw fail.inval(`MIG_DATA_READ of ${r.size} bytes exceeds max_data_xfer_size ${req.session.maxDataXferSize}`);
  if (r.argsz < 8 + r.size) throw fail.inval(`MIG_DATA_READ argsz ${r.argsz} cannot hold ${r.size} bytes`);
  // The segments may be views of device memory, valid until this handler
  // yields (MigrationController.read): it stays synchronous, and the
  // connection sends the reply before it returns.
  const faults = req.endpoint.faults;
  if (faults !== null) return readWithFaults(req, faults.migDataRead(req.header, r.size));
  const segments = req.endpoint.migration.read(r.size);
  const conf = req.session.conformance;
  if (conf !== null) conf.migDataRead(req.header, req.endpoint.migrationState === MigState.STOP_COPY, byteLength(segments));
  if (segments.length === 1 || segments.length > MAX_REPLY_SEGMENTS) {
    const data = segments.length === 1 ? segments[0]! : Buffer.concat(segments);
    return { parts: encodeMigDataReadReplyParts({ argsz: 8 + data.length, size: data.length, data }) };
  }
  // Several segments (a reply spanning records) go out as they are, views
  // and all: the connection sends [header, fixed part, ...segments] as one
  // vectored message, so nothing is concatenated here.
  let size = 0;
  for (let i = 0; i < segments.length; i++) size += segments[i]!.byteLength;
  const parts: Uint8Array[] = [readReplyFixed(size)];
  for (let i = 0; i < segments.length; i++) parts.push(segments[i]!);
  return { parts };
}

/**
 * MIG_DATA_READ under injected faults: fewer bytes read (the rest stays
 * queued), or a bit flipped in a copy of the data (device memory and the
 * queued stream are untouched; the destination sees a corrupt stream).
 */
function readWithFaults(req: Request, f: { size: number; corrupt: number | null }): Reply {
  const segments = req.endpoint.migration.read(f.size);
  let data = segments.length === 1 ? segments[0]! : Buffer.concat(segments);
  req.session.conformance?.migDataRead(req.header, req.endpoint.migrationState === MigState.STOP_COPY, data.length);
  if (f.corrupt !== null) {
    if (f.corrupt < data.length) {
      data = Buffer.from(data);
      data[f.corrupt]! ^= 0x01;
    } else {
      req.log.warn({ msgId: req.header.msgId, offset: f.corrupt, size: data.length }, "fault injected: nothing to corrupt (the reply is shorter than the offset); sent as it is");
    }
  }
  return { parts: encodeMigDataReadReplyParts({ argsz: 8 + data.length, size: data.length, data }) };
}

function byteLength(segments: readonly Uint8Array[]): number {
  let n = 0;
  for (let i = 0; i < segments.length; i++) n += segments[i]!.byteLength;
  return n;
}

/** The reply's fixed part (argsz, size) for `size` data bytes sent as separate parts; the same bytes encodeMigDataReadReplyParts writes. */
function readReplyFixed(size: number): Buffer {
  const { buf, view } = allocBody(MessageSize.MIG_DATA_FIXED);
  putU32(view, 0, MessageSize.MIG_DATA_FIXED + size, "argsz");
  putU32(view, 4, size, "size");
  return buf;
}

export function handleMigDataWrite(req: Request): Reply {
  const w = decodeMigDataWriteRequest(req.body);
  if (w.size > req.session.maxDataXferSize) throw fail.inval(`MIG_DATA_WRITE of ${w.size} bytes exceeds max_data_xfer_size`);
  req.endpoint.migration.write(w.data);
  return reply(encodeMigDataWriteReply());
}

export function handleMigGetPrecopyInfo(req: Request): Reply {
  decodeMigGetPrecopyInfoRequest(req.body);
  if (precopyInfoArgszOmitted(req.body)) req.session.conformance?.note("argsz-zero", req.header, 0, "24-byte request with argsz 0 (read as 24)");
  const real = req.endpoint.migration.precopyInfo();
  const info = req.endpoint.faults === null ? real : req.endpoint.faults.precopyInfo(req.header, real);
  return reply(encodeMigGetPrecopyInfoReply({ argsz: 24, flags: 0, initial_bytes: info.initialBytes, dirty_bytes: info.dirtyBytes }));
}

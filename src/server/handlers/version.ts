/** VERSION: agree on the protocol version and capabilities (spec: "VFIO_USER_VERSION"). */
import { PROTOCOL_MAJOR, PROTOCOL_MINOR } from "../../../protocol/constants.ts";
import { parseCapabilities, serializeCapabilities } from "../../../protocol/capabilities.ts";
import { fail } from "../../../protocol/errors.ts";
import { decodeVersion, encodeVersion } from "../../../protocol/messages/version.ts";
import { reply, type Reply, type Request } from "../dispatcher.ts";
import { lowestBit, servedBitmapSize } from "../session.ts";

export function handleVersion(req: Request): Reply {
  const v = decodeVersion(req.body);
  // spec: the server must support the client's major version, and answers with a minor <= the proposed one
  if (v.major !== PROTOCOL_MAJOR) {
    // spec: the server "closes the connection if it cannot support the advertised version";
    // the error reply goes out first so the client learns why
    req.closeAfterReply();
    throw fail.notsup(`protocol major ${v.major} is not supported (this server speaks ${PROTOCOL_MAJOR})`);
  }
  const minor = Math.min(v.minor, PROTOCOL_MINOR);
  const client = parseCapabilities(v.data);
  const { session } = req;
  const limits = session.limits;
  session.maxDataXferSize = Math.min(client.max_data_xfer_size, limits.maxDataXferSize);
  session.clientMaxMsgFds = client.max_msg_fds;
  const both = client.migration ? limits.migrationPgsize & client.migration.pgsize : limits.migrationPgsize;
  const pgsize = both !== 0n ? both : limits.migrationPgsize;
  session.migrationPgsize = lowestBit(pgsize);
  // advertise only what is served: the smaller of the client's offer and what the dirty log reports
  const served = servedBitmapSize(limits);
  session.maxBitmapSize = client.migration ? Math.min(served, client.migration.max_bitmap_size) : served;
  const caps = serializeCapabilities({
    max_msg_fds: limits.maxMsgFds,
    max_data_xfer_size: session.maxDataXferSize,
    pgsizes: 4096n,
    max_dma_maps: limits.maxDmaMaps,
    write_multiple: true,
    migration: { pgsize, max_bitmap_size: session.maxBitmapSize },
  });
  session.versionDone = true;
  session.onNegotiated?.(session.maxDataXferSize);
  req.log.info({ major: v.major, minor, client: v.data }, "version negotiated");
  return reply(encodeVersion({ major: PROTOCOL_MAJOR, minor, data: caps }));
}

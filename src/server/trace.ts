/**
 * `--trace`: each message's decoded fields for the log line, with the
 * spec's names (region, offset, count, address, size, flags, index,
 * start, device_state...). 64-bit values are hex strings, data is its
 * length, flags of DEVICE_FEATURE name the feature and GET/SET/PROBE. Only
 * called with tracing on: the decoding happens a second time, off the hot
 * path. A body that does not decode gets `decodeError` instead (the handler
 * replies with the real error).
 */
import {
  Command,
  Feature,
  FeatureFlags,
  MIG_STATE_NAMES,
  decodeDeviceFeatureReply,
  decodeDeviceFeatureRequest,
  decodeDeviceGetIrqInfoReply,
  decodeDeviceGetIrqInfoRequest,
  decodeDeviceGetRegionInfoReply,
  decodeDeviceGetRegionInfoRequest,
  decodeDeviceGetInfoReply,
  decodeDeviceSetIrqsRequest,
  decodeDmaLoggingControl,
  decodeDmaLoggingReportRequest,
  decodeDmaMapRequest,
  decodeDmaReadRequest,
  decodeDmaReadReply,
  decodeDmaUnmapRequest,
  decodeDmaWriteRequest,
  decodeFeatureMigDataSize,
  decodeFeatureMigState,
  decodeFeatureMigration,
  decodeMigDataReadReply,
  decodeMigDataReadRequest,
  decodeMigDataWriteRequest,
  decodeMigGetPrecopyInfoReply,
  decodeRegionReadReply,
  decodeRegionReadRequest,
  decodeRegionWriteMultiRequest,
  decodeRegionWriteRequest,
  decodeVersion,
} from "../../protocol/index.ts";

type Fields = Record<string, unknown>;

const FEATURE_NAMES: Readonly<Record<number, string>> = Object.fromEntries(Object.entries(Feature).map(([k, v]) => [v, k]));

/** bigint -> "0x...", Uint8Array -> its length, nested objects flattened one level with a dot. */
function flatten(value: Record<string, unknown>, into: Fields = {}, prefix = ""): Fields {
  for (const [k, v] of Object.entries(value)) {
    const key = prefix + k;
    if (typeof v === "bigint") into[key] = `0x${v.toString(16)}`;
    else if (v instanceof Uint8Array) into[`${key}Bytes`] = v.length;
    else if (Array.isArray(v)) into[key] = v.length <= 8 ? v.map((x) => (typeof x === "object" && x !== null ? flatten(x as Record<string, unknown>) : x)) : `${v.length} items`;
    else if (typeof v === "object" && v !== null) flatten(v as Record<string, unknown>, into, `${key}.`);
    else into[key] = v;
  }
  return into;
}

function featureName(flags: number): { feature: string; op: string } {
  const op = [flags & FeatureFlags.GET ? "GET" : "", flags & FeatureFlags.SET ? "SET" : "", flags & FeatureFlags.PROBE ? "PROBE" : ""].filter(Boolean).join("|") || "none";
  const n = flags & FeatureFlags.MASK;
  return { feature: FEATURE_NAMES[n] ?? String(n), op };
}

/** Feature data by feature number, request (SET/GET input) or reply. */
function featureData(flags: number, data: Uint8Array, reply: boolean): Fields {
  if (data.length === 0) return {};
  const n = flags & FeatureFlags.MASK;
  switch (n) {
    case Feature.MIGRATION:
      return reply ? flatten(decodeFeatureMigration(data) as unknown as Record<string, unknown>) : {};
    case Feature.MIG_DEVICE_STATE: {
      const s = decodeFeatureMigState(data);
      return { state: MIG_STATE_NAMES[s.device_state] ?? s.device_state, data_fd: s.data_fd };
    }
    case Feature.DMA_LOGGING_START:
      return reply ? {} : flatten(decodeDmaLoggingControl(data) as unknown as Record<string, unknown>);
    case Feature.DMA_LOGGING_REPORT:
      return reply ? { bitmapBytes: Math.max(0, data.length - 24) } : flatten(decodeDmaLoggingReportRequest(data) as unknown as Record<string, unknown>);
    case Feature.MIG_DATA_SIZE:
      return reply ? flatten(decodeFeatureMigDataSize(data) as unknown as Record<string, unknown>) : {};
    default:
      return { dataBytes: data.length };
  }
}

type Decoder = (body: Uint8Array) => object;

const version: Decoder = (body) => {
  const v = decodeVersion(body);
  return { major: v.major, minor: v.minor, caps: v.data };
};

/** Requests: command -> decoder (commands with an empty body have none). */
const REQUESTS: Readonly<Record<number, Decoder>> = {
  [Command.VERSION]: version,
  [Command.DMA_MAP]: decodeDmaMapRequest,
  [Command.DMA_UNMAP]: decodeDmaUnmapRequest,
  [Command.DEVICE_GET_REGION_INFO]: decodeDeviceGetRegionInfoRequest,
  [Command.DEVICE_GET_IRQ_INFO]: decodeDeviceGetIrqInfoRequest,
  [Command.DEVICE_SET_IRQS]: decodeDeviceSetIrqsRequest,
  [Command.REGION_READ]: decodeRegionReadRequest,
  [Command.REGION_WRITE]: decodeRegionWriteRequest,
  [Command.REGION_WRITE_MULTI]: decodeRegionWriteMultiRequest,
  [Command.DMA_READ]: decodeDmaReadRequest,
  [Command.DMA_WRITE]: decodeDmaWriteRequest,
  [Command.DEVICE_FEATURE]: (body) => {
    const f = decodeDeviceFeatureRequest(body);
    return { argsz: f.argsz, ...featureName(f.flags), ...featureData(f.flags, f.data, false) };
  },
  [Command.MIG_DATA_READ]: decodeMigDataReadRequest,
  [Command.MIG_DATA_WRITE]: decodeMigDataWriteRequest,
};

/** Replies with a payload: command -> decoder. */
const REPLIES: Readonly<Record<number, Decoder>> = {
  [Command.VERSION]: version,
  [Command.DEVICE_GET_INFO]: decodeDeviceGetInfoReply,
  [Command.DEVICE_GET_REGION_INFO]: decodeDeviceGetRegionInfoReply,
  [Command.DEVICE_GET_IRQ_INFO]: decodeDeviceGetIrqInfoReply,
  [Command.REGION_READ]: decodeRegionReadReply,
  [Command.DMA_READ]: decodeDmaReadReply,
  [Command.DEVICE_FEATURE]: (body) => {
    const f = decodeDeviceFeatureReply(body);
    return { ...featureName(f.flags), ...featureData(f.flags, f.data, true) };
  },
  [Command.MIG_DATA_READ]: decodeMigDataReadReply,
  [Command.MIG_GET_PRECOPY_INFO]: decodeMigGetPrecopyInfoReply,
};

/** The decoded fields of a request (or, with `isReply`, a reply; error replies have none). */
export function traceFields(command: number, body: Uint8Array, isReply = false): Fields {
  const decode = (isReply ? REPLIES : REQUESTS)[command];
  if (decode === undefined) return {};
  try {
    return flatten(decode(body) as Record<string, unknown>);
  } catch (err) {
    return { decodeError: (err as Error).message };
  }
}

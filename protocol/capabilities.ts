/**
 * The JSON carried by VERSION (spec: "VFIO_USER_VERSION", capability tables):
 *
 *   {"capabilities": {"max_msg_fds": 16, "max_data_xfer_size": 1048576,
 *     "pgsizes": 4096, "max_dma_maps": 65535, "write_multiple": true,
 *     "migration": {"pgsize": 4096, "max_bitmap_size": 268435456},
 *     "twin_socket": {"supported": true, "fd_index": 0}}}
 *
 * Every capability is optional; parsing applies the spec's defaults. Keys this
 * codec does not know are kept in `unknown` (never interpreted); the server
 * should not echo them, since the reply must be a subset of what it supports.
 */
import { CapabilityName as N, Defaults } from "./constants.ts";
import { fail } from "./errors.ts";
import { U32_MAX, U64_MAX } from "./u64.ts";

/** `twin_socket`: server-to-client commands on a separate socket. */
export interface TwinSocketCapability {
  /** The sender supports twin-socket mode (default false). */
  supported: boolean;
  /** Index of the socket in the reply's fd array; only valid in the reply. */
  fd_index?: number;
}

/** `migration` (QEMU's client sends it; not in the current spec table). */
export interface MigrationCapability {
  /** Dirty-page granularity(ies) supported, as a page-size bitmap. */
  pgsize: bigint;
  /** Largest dirty bitmap in bytes the sender accepts. */
  max_bitmap_size: number;
}

export interface Capabilities {
  /** Most fds the sender can receive in one message (default 1). */
  max_msg_fds: number;
  /** Largest `count` of a data transfer message (default 1 MiB). */
  max_data_xfer_size: number;
  /** Page sizes supported for DMA_MAP, or'ed together (default 4096). */
  pgsizes: bigint;
  /** Most DMA windows valid at once (default 65535). */
  max_dma_maps: number;
  /** REGION_WRITE_MULTI supported (default false). */
  write_multiple: boolean;
  /** Absent when the sender did not include it. */
  twin_socket?: TwinSocketCapability;
  /** Absent when the sender did not include it. */
  migration?: MigrationCapability;
  /** Members of `capabilities` this codec does not know, as parsed. */
  unknown: Record<string, unknown>;
}

/** The capabilities a peer has when it sends none. */
export function defaultCapabilities(): Capabilities {
  return {
    max_msg_fds: Defaults.MAX_MSG_FDS,
    max_data_xfer_size: Defaults.MAX_DATA_XFER_SIZE,
    pgsizes: BigInt(Defaults.PGSIZE),
    max_dma_maps: Defaults.MAX_DMA_MAPS,
    write_multiple: false,
    unknown: {},
  };
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

function intField(obj: Record<string, unknown>, key: string, min: number, max: number): number | undefined {
  const v = obj[key];
  if (v === undefined) return undefined;
  if (typeof v !== "number" || !Number.isInteger(v) || v < min || v > max) {
    throw fail.inval(`capability ${key}: expected an integer in [${min}, ${max}], got ${JSON.stringify(v)}`);
  }
  return v;
}

/**
 * A page-size bitmap as bigint. Masks of page sizes >= 4 KiB span at most 52
 * bits, so a JSON number carries them exactly even above 2^53.
 */
function maskField(obj: Record<string, unknown>, key: string): bigint | undefined {
  const v = obj[key];
  if (v === undefined) return undefined;
  if (typeof v !== "number" || !Number.isInteger(v) || v <= 0 || v > Number(U64_MAX)) {
    throw fail.inval(`capability ${key}: expected a non-zero page-size mask, got ${JSON.stringify(v)}`);
  }
  const mask = BigInt(v);
  if (mask > U64_MAX) throw fail.inval(`capability ${key}: mask exceeds 64 bits`);
  return mask;
}

function boolField(obj: Record<string, unknown>, key: string): boolean | undefined {
  const v = obj[key];
  if (v === undefined) return undefined;
  if (typeof v !== "boolean") throw fail.inval(`capability ${key}: expected a boolean, got ${JSON.stringify(v)}`);
  return v;
}

function objField(obj: Record<string, unknown>, key: string): Record<string, unknown> | undefined {
  const v = obj[key];
  if (v === undefined) return undefined;
  if (!isObject(v)) throw fail.inval(`capability ${key}: expected an object, got ${JSON.stringify(v)}`);
  return v;
}

const KNOWN = new Set<string>([
  N.MAX_MSG_FDS,
  N.MAX_DATA_XFER_SIZE,
  N.PGSIZES,
  N.MAX_DMA_MAPS,
  N.WRITE_MULTIPLE,
  N.TWIN_SOCKET,
  N.MIGRATION,
]);

/**
 * Parses VERSION data (the JSON text, without its NUL). Empty data means no
 * capabilities (spec: "version data ... Optional"). Bad JSON, a non-object,
 * or a known key of the wrong type or range throws VfioUserError(EINVAL).
 */
export function parseCapabilities(data: string): Capabilities {
  const caps = defaultCapabilities();
  if (data.length === 0) return caps;
  let root: unknown;
  try {
    root = JSON.parse(data);
  } catch (err) {
    throw fail.inval(`version data is not JSON: ${(err as Error).message}`);
  }
  if (!isObject(root)) throw fail.inval("version data is not a JSON object");
  const c = objField(root, N.CAPABILITIES);
  if (c === undefined) return caps;

  caps.max_msg_fds = intField(c, N.MAX_MSG_FDS, 0, U32_MAX) ?? caps.max_msg_fds;
  caps.max_data_xfer_size = intField(c, N.MAX_DATA_XFER_SIZE, 1, U32_MAX) ?? caps.max_data_xfer_size;
  caps.pgsizes = maskField(c, N.PGSIZES) ?? caps.pgsizes;
  caps.max_dma_maps = intField(c, N.MAX_DMA_MAPS, 0, U32_MAX) ?? caps.max_dma_maps;
  caps.write_multiple = boolField(c, N.WRITE_MULTIPLE) ?? caps.write_multiple;

  const twin = objField(c, N.TWIN_SOCKET);
  if (twin !== undefined) {
    const t: TwinSocketCapability = { supported: boolField(twin, N.SUPPORTED) ?? false };
    const fdIndex = intField(twin, N.FD_INDEX, 0, U32_MAX);
    if (fdIndex !== undefined) t.fd_index = fdIndex;
    caps.twin_socket = t;
  }

  const mig = objField(c, N.MIGRATION);
  if (mig !== undefined) {
    caps.migration = {
      pgsize: maskField(mig, N.PGSIZE) ?? BigInt(Defaults.MIGRATION_PGSIZE),
      max_bitmap_size: intField(mig, N.MAX_BITMAP_SIZE, 0, Number.MAX_SAFE_INTEGER) ?? Defaults.MAX_BITMAP_SIZE,
    };
  }

  for (const key of Object.keys(c)) {
    if (!KNOWN.has(key)) caps.unknown[key] = c[key];
  }
  return caps;
}

function checkInt(value: number, key: string, min: number, max: number): string {
  if (!Number.isInteger(value) || value < min || value > max) throw new RangeError(`${key} out of range: ${value}`);
  return String(value);
}

function checkMask(value: bigint, key: string): string {
  if (value <= 0n || value > U64_MAX) throw new RangeError(`${key} out of range: ${value}`);
  return value.toString();
}

/**
 * Serializes the given capabilities as VERSION data (without the NUL):
 * `{"capabilities":{...}}` holding only the keys present in `caps`, in a
 * fixed order. `unknown` members are written last, as given. Throws
 * RangeError for out-of-range values.
 */
export function serializeCapabilities(caps: Partial<Capabilities>): string {
  const parts: string[] = [];
  const put = (key: string, json: string) => parts.push(`${JSON.stringify(key)}:${json}`);
  if (caps.max_msg_fds !== undefined) put(N.MAX_MSG_FDS, checkInt(caps.max_msg_fds, N.MAX_MSG_FDS, 0, U32_MAX));
  if (caps.max_data_xfer_size !== undefined) {
    put(N.MAX_DATA_XFER_SIZE, checkInt(caps.max_data_xfer_size, N.MAX_DATA_XFER_SIZE, 1, U32_MAX));
  }
  if (caps.pgsizes !== undefined) put(N.PGSIZES, checkMask(caps.pgsizes, N.PGSIZES));
  if (caps.max_dma_maps !== undefined) put(N.MAX_DMA_MAPS, checkInt(caps.max_dma_maps, N.MAX_DMA_MAPS, 0, U32_MAX));
  if (caps.write_multiple !== undefined) put(N.WRITE_MULTIPLE, caps.write_multiple ? "true" : "false");
  if (caps.twin_socket !== undefined) {
    const t = caps.twin_socket;
    let json = `{${JSON.stringify(N.SUPPORTED)}:${t.supported ? "true" : "false"}`;
    if (t.fd_index !== undefined) json += `,${JSON.stringify(N.FD_INDEX)}:${checkInt(t.fd_index, N.FD_INDEX, 0, U32_MAX)}`;
    put(N.TWIN_SOCKET, `${json}}`);
  }
  if (caps.migration !== undefined) {
    const m = caps.migration;
    put(
      N.MIGRATION,
      `{${JSON.stringify(N.PGSIZE)}:${checkMask(m.pgsize, N.PGSIZE)},` +
        `${JSON.stringify(N.MAX_BITMAP_SIZE)}:${checkInt(m.max_bitmap_size, N.MAX_BITMAP_SIZE, 0, Number.MAX_SAFE_INTEGER)}}`,
    );
  }
  if (caps.unknown !== undefined) {
    for (const [key, value] of Object.entries(caps.unknown)) {
      if (KNOWN.has(key)) throw new RangeError(`unknown capability ${key} shadows a known one`);
      const json = JSON.stringify(value);
      if (json === undefined) throw new RangeError(`capability ${key} is not JSON-serializable`);
      put(key, json);
    }
  }
  return `{${JSON.stringify(N.CAPABILITIES)}:{${parts.join(",")}}}`;
}

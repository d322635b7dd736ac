/**
 * VFIO_USER_DEVICE_FEATURE (spec: "VFIO_USER_DEVICE_FEATURE"), the socket
 * form of VFIO_DEVICE_FEATURE. Request and reply share the layout:
 *
 *   0  argsz u32  request: maximum reply payload size; reply: full payload size
 *   4  flags u32  bits 0-15 feature index, 16 GET, 17 SET, 18 PROBE
 *   8  data       feature-specific (see device-feature-data.ts)
 *
 * spec: "The reply payload must be the same as the request payload for
 * setting or probing a feature. For getting a feature's data, the data is
 * added in the data section and its length is added to argsz."
 */
import { FeatureFlags, MessageSize } from "../constants.ts";
import { fail } from "../errors.ts";
import { allocBody, asBuffer, joinParts, needArgsz, needAtLeast, putU32, viewOf } from "../wire.ts";

const KNOWN_FLAGS = FeatureFlags.MASK | FeatureFlags.GET | FeatureFlags.SET | FeatureFlags.PROBE;

/** Client -> server: get, set or probe feature `flags & FeatureFlags.MASK`. */
export interface DeviceFeatureRequest {
  /** Maximum size of the reply payload, the 8-byte fixed part included. */
  argsz: number;
  /** Feature index in bits 0-15 plus GET / SET / PROBE. */
  flags: number;
  /** Feature data for SET (and GET inputs such as DMA_LOGGING_REPORT); a view aliasing the body when decoded. */
  data: Uint8Array;
}

/** Server -> client: same layout; GET adds the feature data. */
export type DeviceFeatureReply = DeviceFeatureRequest;

/** The feature index of a flags word (VFIO_DEVICE_FEATURE_MASK). */
export function featureIndex(flags: number): number {
  return flags & FeatureFlags.MASK;
}

/** The message as [fixed part, data]; data is referenced, not cloned. */
export function encodeDeviceFeatureParts(msg: DeviceFeatureRequest): Uint8Array[] {
  const { buf, view } = allocBody(MessageSize.DEVICE_FEATURE_FIXED);
  putU32(view, 0, msg.argsz, "argsz");
  putU32(view, 4, msg.flags, "flags");
  return msg.data.length === 0 ? [buf] : [buf, msg.data];
}

export function encodeDeviceFeature(msg: DeviceFeatureRequest): Buffer {
  return joinParts(encodeDeviceFeatureParts(msg));
}

function decode(body: Uint8Array, what: string): DeviceFeatureRequest {
  needAtLeast(body, MessageSize.DEVICE_FEATURE_FIXED, what);
  const view = viewOf(body);
  return {
    argsz: view.getUint32(0, true),
    flags: view.getUint32(4, true),
    data: asBuffer(body).subarray(MessageSize.DEVICE_FEATURE_FIXED),
  };
}

export const encodeDeviceFeatureRequest = encodeDeviceFeature;
export const encodeDeviceFeatureReply = encodeDeviceFeature;
export const encodeDeviceFeatureRequestParts = encodeDeviceFeatureParts;
export const encodeDeviceFeatureReplyParts = encodeDeviceFeatureParts;

/**
 * Decodes a request. EINVAL when the body is under 8 bytes, argsz < 8,
 * flags carry undefined bits, or GET and SET come together without PROBE.
 * Whether the feature exists and the data fits it is the handler's call.
 */
export function decodeDeviceFeatureRequest(body: Uint8Array): DeviceFeatureRequest {
  const what = "DEVICE_FEATURE";
  const msg = decode(body, what);
  needArgsz(msg.argsz, MessageSize.DEVICE_FEATURE_FIXED, what);
  if ((msg.flags & ~KNOWN_FLAGS) !== 0) throw fail.inval(`${what}: undefined flags 0x${msg.flags.toString(16)}`).with({ rule: "undefined-flags", offset: 4 });
  // spec: "VFIO_DEVICE_FEATURE_GET and VFIO_DEVICE_FEATURE_SET are mutually exclusive, except for use with PROBE"
  const getSet = FeatureFlags.GET | FeatureFlags.SET;
  if ((msg.flags & getSet) === getSet && (msg.flags & FeatureFlags.PROBE) === 0) {
    throw fail.inval(`${what}: GET and SET together without PROBE`);
  }
  return msg;
}

/** Decodes a reply (only the length is checked). The data aliases `body`. */
export function decodeDeviceFeatureReply(body: Uint8Array): DeviceFeatureReply {
  return decode(body, "DEVICE_FEATURE reply");
}

/**
 * VFIO_USER_DEVICE_RESET (spec: "VFIO_USER_DEVICE_RESET"):
 * "Neither the request or reply have a payload."
 */
import { needExactly } from "../wire.ts";

/** Client -> server: reset the device. No payload. */
export type DeviceResetRequest = Record<string, never>;
/** Server -> client. No payload. */
export type DeviceResetReply = Record<string, never>;

export function encodeDeviceResetRequest(_msg: DeviceResetRequest = {}): Buffer {
  return Buffer.alloc(0);
}

/** EINVAL for a non-empty body. */
export function decodeDeviceResetRequest(body: Uint8Array): DeviceResetRequest {
  needExactly(body, 0, "DEVICE_RESET");
  return {};
}

export function encodeDeviceResetReply(_msg: DeviceResetReply = {}): Buffer {
  return Buffer.alloc(0);
}

export function decodeDeviceResetReply(body: Uint8Array): DeviceResetReply {
  needExactly(body, 0, "DEVICE_RESET reply");
  return {};
}

/**
 * VFIO_USER_DEVICE_GET_INFO (spec: "VFIO_USER_DEVICE_GET_INFO").
 *
 * Request and reply (16 bytes):
 *   0  argsz       u32  request: maximum reply size; reply: 16
 *   4  flags       u32  VFIO_DEVICE_FLAGS_RESET / _PCI
 *   8  num_regions u32
 *  12  num_irqs    u32
 */
import { MessageSize } from "../constants.ts";
import { allocBody, needArgsz, needExactly, needZero, putU32, viewOf } from "../wire.ts";

/** Client -> server. Only argsz is set; the spec says the other fields must be zero. */
export interface DeviceGetInfoRequest {
  /** Maximum size of the reply payload; at least 16. */
  argsz: number;
}

/** Server -> client. */
export interface DeviceGetInfoReply {
  /** Size of the full reply payload, 16. */
  argsz: number;
  /** `DeviceInfoFlags.*`. */
  flags: number;
  /** Number of regions (max region index + 1). */
  num_regions: number;
  /** Number of IRQ types (max IRQ index + 1). */
  num_irqs: number;
}

export function encodeDeviceGetInfoRequest(msg: DeviceGetInfoRequest): Buffer {
  const { buf, view } = allocBody(MessageSize.DEVICE_INFO);
  putU32(view, 0, msg.argsz, "argsz");
  return buf;
}

/** EINVAL when the body is not 16 bytes, argsz < 16, or a non-argsz field is non-zero. */
export function decodeDeviceGetInfoRequest(body: Uint8Array): DeviceGetInfoRequest {
  needExactly(body, MessageSize.DEVICE_INFO, "DEVICE_GET_INFO");
  const view = viewOf(body);
  const argsz = view.getUint32(0, true);
  // spec: "argsz is the maximum size of the reply payload" (16 bytes today)
  needArgsz(argsz, MessageSize.DEVICE_INFO, "DEVICE_GET_INFO");
  // spec: "all other fields must be zero."
  needZero(view.getUint32(4, true), "flags", "DEVICE_GET_INFO", 4);
  needZero(view.getUint32(8, true), "num_regions", "DEVICE_GET_INFO", 8);
  needZero(view.getUint32(12, true), "num_irqs", "DEVICE_GET_INFO", 12);
  return { argsz };
}

export function encodeDeviceGetInfoReply(msg: DeviceGetInfoReply): Buffer {
  const { buf, view } = allocBody(MessageSize.DEVICE_INFO);
  putU32(view, 0, msg.argsz, "argsz");
  putU32(view, 4, msg.flags, "flags");
  putU32(view, 8, msg.num_regions, "num_regions");
  putU32(view, 12, msg.num_irqs, "num_irqs");
  return buf;
}

export function decodeDeviceGetInfoReply(body: Uint8Array): DeviceGetInfoReply {
  needExactly(body, MessageSize.DEVICE_INFO, "DEVICE_GET_INFO reply");
  const view = viewOf(body);
  return {
    argsz: view.getUint32(0, true),
    flags: view.getUint32(4, true),
    num_regions: view.getUint32(8, true),
    num_irqs: view.getUint32(12, true),
  };
}

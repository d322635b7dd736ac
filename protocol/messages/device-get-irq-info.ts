/**
 * VFIO_USER_DEVICE_GET_IRQ_INFO (spec: "VFIO_USER_DEVICE_GET_IRQ_INFO").
 *
 * Request and reply (16 bytes, struct vfio_irq_info):
 *   0  argsz u32
 *   4  flags u32  VFIO_IRQ_INFO_EVENTFD / MASKABLE / AUTOMASKED / NORESIZE
 *   8  index u32  IRQ type (e.g. VFIO_PCI_MSIX_IRQ_INDEX)
 *  12  count u32  number of interrupts of that type
 */
import { MessageSize } from "../constants.ts";
import { allocBody, needArgsz, needExactly, needZero, putU32, viewOf } from "../wire.ts";

/** Client -> server. flags and count must be zero. */
export interface DeviceGetIrqInfoRequest {
  /** Maximum size of the reply payload; at least 16. */
  argsz: number;
  /** IRQ type being queried (`IrqIndex.*`). */
  index: number;
}

/** Server -> client. */
export interface DeviceGetIrqInfoReply {
  /** Size of the full reply payload, 16. */
  argsz: number;
  /** `IrqInfoFlags.*`. */
  flags: number;
  /** IRQ type queried. */
  index: number;
  /** Number of interrupts of that type. */
  count: number;
}

export function encodeDeviceGetIrqInfoRequest(msg: DeviceGetIrqInfoRequest): Buffer {
  const { buf, view } = allocBody(MessageSize.IRQ_INFO);
  putU32(view, 0, msg.argsz, "argsz");
  putU32(view, 8, msg.index, "index");
  return buf;
}

/** EINVAL when the body is not 16 bytes, argsz < 16, or flags/count are non-zero. */
export function decodeDeviceGetIrqInfoRequest(body: Uint8Array): DeviceGetIrqInfoRequest {
  needExactly(body, MessageSize.IRQ_INFO, "DEVICE_GET_IRQ_INFO");
  const view = viewOf(body);
  const argsz = view.getUint32(0, true);
  // spec: "argsz is the maximum size of the reply payload (16 bytes today)"
  needArgsz(argsz, MessageSize.IRQ_INFO, "DEVICE_GET_IRQ_INFO");
  // spec: "all other fields must be zero"
  needZero(view.getUint32(4, true), "flags", "DEVICE_GET_IRQ_INFO", 4);
  needZero(view.getUint32(12, true), "count", "DEVICE_GET_IRQ_INFO", 12);
  return { argsz, index: view.getUint32(8, true) };
}

export function encodeDeviceGetIrqInfoReply(msg: DeviceGetIrqInfoReply): Buffer {
  const { buf, view } = allocBody(MessageSize.IRQ_INFO);
  putU32(view, 0, msg.argsz, "argsz");
  putU32(view, 4, msg.flags, "flags");
  putU32(view, 8, msg.index, "index");
  putU32(view, 12, msg.count, "count");
  return buf;
}

export function decodeDeviceGetIrqInfoReply(body: Uint8Array): DeviceGetIrqInfoReply {
  needExactly(body, MessageSize.IRQ_INFO, "DEVICE_GET_IRQ_INFO reply");
  const view = viewOf(body);
  return {
    argsz: view.getUint32(0, true),
    flags: view.getUint32(4, true),
    index: view.getUint32(8, true),
    count: view.getUint32(12, true),
  };
}

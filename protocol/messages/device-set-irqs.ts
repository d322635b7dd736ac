/**
 * VFIO_USER_DEVICE_SET_IRQS (spec: "VFIO_USER_DEVICE_SET_IRQS").
 *
 * Request:
 *   0  argsz u32  size of the request payload, data included
 *   4  flags u32  one DATA_* bit and one ACTION_* bit
 *   8  index u32  IRQ type
 *  12  start u32  first sub-index
 *  16  count u32  number of sub-indexes
 *  20  data       DATA_BOOL: `count` bytes of booleans; otherwise nothing
 *
 * With DATA_EVENTFD the eventfds travel as ancillary data, not in the body;
 * none at all de-assigns. Reply: no payload.
 */
import { IrqSetFlags, MessageSize } from "../constants.ts";
import { fail } from "../errors.ts";
import { allocBody, asBuffer, needArgsz, needAtLeast, needExactly, putU32, viewOf } from "../wire.ts";

const DATA_BITS = IrqSetFlags.DATA_TYPE_MASK;
const ACTION_BITS = IrqSetFlags.ACTION_TYPE_MASK;

/** Client -> server. */
export interface DeviceSetIrqsRequest {
  /** Size of the request payload including data. */
  argsz: number;
  /** One `IrqSetFlags.DATA_*` and one `IrqSetFlags.ACTION_*`. */
  flags: number;
  /** IRQ type (`IrqIndex.*`). */
  index: number;
  /** First sub-index affected. */
  start: number;
  /** Number of sub-indexes; 0 with DATA_NONE (and start 0) disables the whole index. */
  count: number;
  /** DATA_BOOL only: one byte per sub-index (view into the body; aliases it). */
  data?: Uint8Array;
}

/** Server -> client: no payload. */
export type DeviceSetIrqsReply = Record<string, never>;

function isSingleBit(v: number): boolean {
  return v !== 0 && (v & (v - 1)) === 0;
}

export function encodeDeviceSetIrqsRequest(msg: DeviceSetIrqsRequest): Buffer {
  const data = msg.data ?? new Uint8Array(0);
  const { buf, view } = allocBody(MessageSize.IRQ_SET_FIXED + data.length);
  putU32(view, 0, msg.argsz, "argsz");
  putU32(view, 4, msg.flags, "flags");
  putU32(view, 8, msg.index, "index");
  putU32(view, 12, msg.start, "start");
  putU32(view, 16, msg.count, "count");
  buf.set(data, MessageSize.IRQ_SET_FIXED);
  return buf;
}

/**
 * Decodes a SET_IRQS request. EINVAL when the body is shorter than 20
 * bytes, argsz < 20, flags are not exactly one DATA and one ACTION bit, or
 * the body length disagrees with the data type (DATA_BOOL: 20 + count;
 * DATA_NONE / DATA_EVENTFD: 20).
 */
export function decodeDeviceSetIrqsRequest(body: Uint8Array): DeviceSetIrqsRequest {
  const what = "DEVICE_SET_IRQS";
  needAtLeast(body, MessageSize.IRQ_SET_FIXED, what);
  const view = viewOf(body);
  const argsz = view.getUint32(0, true);
  needArgsz(argsz, MessageSize.IRQ_SET_FIXED, what);
  const flags = view.getUint32(4, true);
  // spec: "The flags are mutually exclusive for both sets."
  if ((flags & ~(DATA_BITS | ACTION_BITS)) !== 0 || !isSingleBit(flags & DATA_BITS) || !isSingleBit(flags & ACTION_BITS)) {
    throw fail.inval(`${what}: flags 0x${flags.toString(16)} are not one DATA and one ACTION bit`);
  }
  const msg: DeviceSetIrqsRequest = {
    argsz,
    flags,
    index: view.getUint32(8, true),
    start: view.getUint32(12, true),
    count: view.getUint32(16, true),
  };
  if ((flags & IrqSetFlags.DATA_BOOL) !== 0) {
    // spec: DATA_BOOL "indicates the data field is an array of boolean bytes"
    if (body.length - MessageSize.IRQ_SET_FIXED !== msg.count) {
      throw fail.inval(`${what}: ${body.length - MessageSize.IRQ_SET_FIXED} data bytes for count ${msg.count}`).with({ rule: "count-mismatch", offset: 16 });
    }
    msg.data = asBuffer(body).subarray(MessageSize.IRQ_SET_FIXED);
  } else if (body.length !== MessageSize.IRQ_SET_FIXED) {
    // spec: DATA_NONE "there is no data field"; DATA_EVENTFD sends the fds as meta-data
    throw fail.inval(`${what}: unexpected ${body.length - MessageSize.IRQ_SET_FIXED} data bytes`);
  }
  return msg;
}

export function encodeDeviceSetIrqsReply(_msg: DeviceSetIrqsReply = {}): Buffer {
  return Buffer.alloc(0);
}

/** spec: "There is no payload in the reply." */
export function decodeDeviceSetIrqsReply(body: Uint8Array): DeviceSetIrqsReply {
  needExactly(body, 0, "DEVICE_SET_IRQS reply");
  return {};
}

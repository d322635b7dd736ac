/** DEVICE_RESET: back to power-on state (spec: "VFIO_USER_DEVICE_RESET"). */
import { fail } from "../../../protocol/errors.ts";
import { EMPTY_REPLY, type Reply, type Request } from "../dispatcher.ts";

export function handleDeviceReset(req: Request): Reply {
  // spec: DEVICE_RESET has no payload
  if (req.body.length !== 0) throw fail.inval(`DEVICE_RESET with a ${req.body.length}-byte body`);
  req.endpoint.reset();
  req.logLimited("info", {}, "device reset");
  return EMPTY_REPLY;
}

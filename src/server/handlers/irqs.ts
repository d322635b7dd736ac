/** DEVICE_SET_IRQS: eventfds, masks and loopback triggers (spec: "VFIO_USER_DEVICE_SET_IRQS"). */
import { readlinkSync } from "node:fs";
import { IrqIndex, IrqSetFlags } from "../../../protocol/constants.ts";
import { fail } from "../../../protocol/errors.ts";
import { decodeDeviceSetIrqsRequest } from "../../../protocol/messages/device-set-irqs.ts";
import { EMPTY_REPLY, type Reply, type Request } from "../dispatcher.ts";

/**
 * Only eventfds are taken as interrupt fds. Interrupts are signalled with a
 * synchronous 8-byte write; a pipe or FIFO the client never drains would
 * block that write, and with it the whole server, after 8192 interrupts
 * (robustness suite: "SET_IRQS with a FIFO as the eventfd"); a regular file
 * or memfd would grow with every interrupt.
 */
function isEventfd(fd: number): boolean {
  try {
    return readlinkSync(`/proc/self/fd/${fd}`) === "anon_inode:[eventfd]";
  } catch {
    return false;
  }
}

function oneBit(v: number): boolean {
  return v !== 0 && (v & (v - 1)) === 0;
}

export function handleDeviceSetIrqs(req: Request): Reply {
  const s = decodeDeviceSetIrqsRequest(req.body);
  const irq = req.endpoint.irq;
  const data = s.flags & IrqSetFlags.DATA_TYPE_MASK;
  const action = s.flags & IrqSetFlags.ACTION_TYPE_MASK;
  // spec (VFIO): exactly one data type and one action
  if (!oneBit(data) || !oneBit(action)) throw fail.inval(`SET_IRQS flags 0x${s.flags.toString(16)}: need one data type and one action`);
  if (s.index >= IrqIndex.NUM_IRQS) throw fail.inval(`IRQ index ${s.index} does not exist`);

  if (data === IrqSetFlags.DATA_EVENTFD) {
    if (action === IrqSetFlags.ACTION_TRIGGER) {
      if (req.fds.length !== s.count) throw fail.inval(`SET_IRQS: ${s.count} vectors but ${req.fds.length} fds`);
      irq.checkRange(s.index, s.start, s.count);
      const bad = req.fds.findIndex((fd) => !isEventfd(fd));
      if (bad >= 0) throw fail.inval(`SET_IRQS: fd ${bad} of the message is not an eventfd`);
      // the controller keeps these fds; take them so the connection does not close them
      irq.setEventfds(s.index, s.start, req.fds.splice(0));
      return EMPTY_REPLY;
    }
    throw fail.notsup("SET_IRQS: eventfds for MASK/UNMASK are not supported");
  }
  if (req.fds.length > 0) throw fail.inval("SET_IRQS: fds without DATA_EVENTFD").with({ rule: "fds-unexpected" });

  if (data === IrqSetFlags.DATA_NONE && action === IrqSetFlags.ACTION_TRIGGER && s.count === 0) {
    // spec (VFIO): count 0 with DATA_NONE and TRIGGER tears down the index
    irq.disableIndex(s.index);
    return EMPTY_REPLY;
  }
  // range first: `count` is a u32 from the wire, and DATA_NONE builds one entry
  // per vector (fuzzer, seed 1: count 0x7fffffff allocated a 2^31-entry
  // array and stalled the server for good)
  irq.checkRange(s.index, s.start, s.count);
  const which = data === IrqSetFlags.DATA_BOOL ? Array.from(s.data ?? [], (b) => b !== 0) : new Array<boolean>(s.count).fill(true);
  if (which.length !== s.count) throw fail.inval(`SET_IRQS: ${s.count} vectors but ${which.length} bool bytes`);
  switch (action) {
    case IrqSetFlags.ACTION_TRIGGER:
      irq.trigger(s.index, s.start, which);
      break;
    case IrqSetFlags.ACTION_MASK:
    case IrqSetFlags.ACTION_UNMASK:
      // VFIO masks only INTx; MSI/MSI-X masking is the client's business
      if (s.index !== IrqIndex.INTX) throw fail.inval(`SET_IRQS: index ${s.index} is not maskable`);
      irq.setMasked(s.index, s.start, which, action === IrqSetFlags.ACTION_MASK);
      break;
  }
  return EMPTY_REPLY;
}

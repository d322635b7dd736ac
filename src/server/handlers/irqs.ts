/** DEVICE_SET_IRQS: eventfds, masks and loopback triggers (spec: "VFIO_USER_DEVICE_SET_IRQS"). */
import { readlinkSync } from "node:fs";
import { IrqIndex, IrqSetFlags } from "../../../protocol/constants.ts";
import { fail } from "../../../protocol/errors.ts";
import { decodeDeviceSetIrqsRequest } from "../../../protocol/messages/device-set-irqs.ts";
import { native } from "../../transport/native.ts";
import { EMPTY_REPLY, type Reply, type Request } from "../dispatcher.ts";

/**
 * Only eventfds are taken as interrupt fds. Interrupts are signalled with a
 * synchronous 8-byte write; a pipe or FIFO the client never drains would
 * block that write, and with it the whole server, after 8192 interrupts
 * (robustness suite: "SET_IRQS with a FIFO as the eventfd"); a regular file
 * or memfd would grow with every interrupt. Even an eventfd blocks once its
 * counter is at 2^64 - 2 (a client can preset it), so each one is made
 * O_NONBLOCK before it is kept (defects-eventfds.test.ts). The flag lives in
 * the open file description the client shares; QEMU's event notifiers are
 * non-blocking anyway.
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
  if (req.log.isLevelEnabled("debug")) {
    req.log.debug({ msgId: req.header.msgId, index: s.index, start: s.start, count: s.count, flags: s.flags, fds: req.fds.length }, "SET_IRQS");
  }
  const data = s.flags & IrqSetFlags.DATA_TYPE_MASK;
  const action = s.flags & IrqSetFlags.ACTION_TYPE_MASK;
  // spec (VFIO): exactly one data type and one action
  if (!oneBit(data) || !oneBit(action)) throw fail.inval(`SET_IRQS flags 0x${s.flags.toString(16)}: need one data type and one action`);
  if (s.index >= IrqIndex.NUM_IRQS) throw fail.inval(`IRQ index ${s.index} does not exist`);
  // kernel (vfio_set_irqs_validate_and_prepare) and libvfio-user: an index
  // without vectors takes no SET_IRQS at all, and count 0 means "the whole
  // index" only from start 0 with DATA_NONE + TRIGGER
  if (irq.counts[s.index] === 0) throw fail.inval(`IRQ index ${s.index} has no vectors`);
  if (s.count === 0 && s.start !== 0) throw fail.inval(`SET_IRQS count 0 with start ${s.start}`);
  if (s.count === 0 && (data !== IrqSetFlags.DATA_NONE || action !== IrqSetFlags.ACTION_TRIGGER)) {
    throw fail.inval("SET_IRQS count 0 is only DATA_NONE + ACTION_TRIGGER (disable the index)");
  }

  if (data === IrqSetFlags.DATA_EVENTFD) {
    if (action === IrqSetFlags.ACTION_TRIGGER) {
      irq.checkRange(s.index, s.start, s.count);
      if (req.fds.length === 0) {
        // spec: "If no file descriptors are provided, this de-assigns the
        // specified previously configured interrupts" (QEMU sends this for
        // each run of unused MSI-X vectors between used ones)
        irq.clearEventfds(s.index, s.start, s.count);
        return EMPTY_REPLY;
      }
      if (req.fds.length !== s.count) throw fail.inval(`SET_IRQS: ${s.count} vectors but ${req.fds.length} fds`);
      const bad = req.fds.findIndex((fd) => !isEventfd(fd));
      if (bad >= 0) throw fail.inval(`SET_IRQS: fd ${bad} of the message is not an eventfd`);
      for (let i = 0; i < req.fds.length; i++) {
        const r = native.setNonblocking(req.fds[i]!, true);
        if (r < 0) throw fail.inval(`SET_IRQS: fd ${i} of the message cannot be made non-blocking (errno ${-r})`);
      }
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

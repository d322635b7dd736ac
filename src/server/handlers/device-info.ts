/** DEVICE_GET_INFO, GET_REGION_INFO, GET_REGION_IO_FDS, GET_IRQ_INFO: describing the device. */
import { DeviceInfoFlags, IoFdType, IoeventfdFlags, IrqIndex, IrqInfoFlags, RegionIndex, RegionInfoFlags } from "../../../protocol/constants.ts";
import { fail } from "../../../protocol/errors.ts";
import { decodeDeviceGetInfoRequest, encodeDeviceGetInfoReply } from "../../../protocol/messages/device-get-info.ts";
import { decodeDeviceGetIrqInfoRequest, encodeDeviceGetIrqInfoReply } from "../../../protocol/messages/device-get-irq-info.ts";
import { decodeDeviceGetRegionInfoRequest, encodeDeviceGetRegionInfoReply } from "../../../protocol/messages/device-get-region-info.ts";
import {
  decodeDeviceGetRegionIoFdsRequest,
  encodeDeviceGetRegionIoFdsReply,
  regionIoFdsArgsz,
  type SubRegionIoFd,
} from "../../../protocol/messages/device-get-region-io-fds.ts";
import { reply, type Reply, type Request } from "../dispatcher.ts";

export function handleDeviceGetInfo(req: Request): Reply {
  decodeDeviceGetInfoRequest(req.body);
  return reply(
    encodeDeviceGetInfoReply({
      argsz: 16,
      flags: DeviceInfoFlags.PCI | DeviceInfoFlags.RESET,
      num_regions: RegionIndex.NUM_REGIONS,
      num_irqs: IrqIndex.NUM_IRQS,
    }),
  );
}

function checkRegionIndex(index: number): void {
  if (index >= RegionIndex.NUM_REGIONS) throw fail.inval(`region ${index} does not exist (${RegionIndex.NUM_REGIONS} regions)`);
}

export function handleDeviceGetRegionInfo(req: Request): Reply {
  const r = decodeDeviceGetRegionInfoRequest(req.body);
  checkRegionIndex(r.index);
  const size = req.endpoint.regionSize(r.index);
  const flags = size > 0n ? RegionInfoFlags.READ | RegionInfoFlags.WRITE : 0;
  return reply(encodeDeviceGetRegionInfoReply({ argsz: 32, flags, index: r.index, cap_offset: 0, size, offset: 0n, caps: [] }));
}

export function handleDeviceGetRegionIoFds(req: Request): Reply {
  const r = decodeDeviceGetRegionIoFdsRequest(req.body);
  checkRegionIndex(r.index);
  // the device's doorbells in this region, each as an ioeventfd of its own
  const bells = req.endpoint.doorbells(r.index);
  const argsz = regionIoFdsArgsz(bells.length);
  const fixed = { argsz, flags: 0, index: r.index, count: bells.length };
  // spec: argsz "indicates the full reply payload size needed"; a client
  // that left too little room gets the count alone, and no fds
  if (bells.length === 0 || r.argsz < argsz) return reply(encodeDeviceGetRegionIoFdsReply({ ...fixed, sub_regions: [] }));
  if (bells.length > req.session.clientMaxMsgFds) {
    throw fail.toobig(`region ${r.index} has ${bells.length} doorbells; the client takes at most ${req.session.clientMaxMsgFds} fds`);
  }
  const fds = req.endpoint.ioEventFds.fdsFor(r.index, bells);
  const sub_regions: SubRegionIoFd[] = bells.map((b, i) => ({
    type: IoFdType.IOEVENTFD,
    offset: BigInt(b.offset),
    size: BigInt(b.size),
    fd_index: i,
    flags: b.datamatch !== undefined ? IoeventfdFlags.DATAMATCH : 0,
    datamatch: b.datamatch ?? 0n,
  }));
  req.log.debug({ region: r.index, count: bells.length }, "doorbells served as ioeventfds");
  return { parts: [encodeDeviceGetRegionIoFdsReply({ ...fixed, sub_regions })], fds };
}

export function handleDeviceGetIrqInfo(req: Request): Reply {
  const r = decodeDeviceGetIrqInfoRequest(req.body);
  if (r.index >= IrqIndex.NUM_IRQS) throw fail.inval(`IRQ index ${r.index} does not exist`);
  const count = req.endpoint.irq.counts[r.index] ?? 0;
  let flags: number = IrqInfoFlags.EVENTFD;
  if (r.index === IrqIndex.INTX) flags |= IrqInfoFlags.MASKABLE | IrqInfoFlags.AUTOMASKED;
  else if (r.index === IrqIndex.MSI || r.index === IrqIndex.MSIX) flags |= IrqInfoFlags.NORESIZE;
  return reply(encodeDeviceGetIrqInfoReply({ argsz: 16, flags, index: r.index, count }));
}

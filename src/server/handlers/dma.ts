/** DMA_MAP / DMA_UNMAP: the client's memory the device may use (spec: "VFIO_USER_DMA_MAP"). */
import { DmaMapFlags, DmaUnmapFlags, MessageSize } from "../../../protocol/constants.ts";
import { fail } from "../../../protocol/errors.ts";
import { decodeDmaMapRequest, encodeDmaMapReply } from "../../../protocol/messages/dma-map.ts";
import { decodeDmaUnmapRequest, encodeDmaUnmapReply } from "../../../protocol/messages/dma-unmap.ts";
import { mapFd } from "../../transport/mapping.ts";
import { native } from "../../transport/native.ts";
import { reply, type Reply, type Request } from "../dispatcher.ts";

export function handleDmaMap(req: Request): Reply {
  const m = decodeDmaMapRequest(req.body);
  if (req.fds.length > 1) throw fail.inval(`DMA_MAP with ${req.fds.length} fds; at most one`).with({ rule: "fds-unexpected" });
  // spec: "argsz is the size of the above structure" (larger is accepted)
  if (m.argsz !== MessageSize.DMA_MAP) req.session.conformance?.note("argsz-mismatch", req.header, 0, `DMA_MAP argsz ${m.argsz}, not ${MessageSize.DMA_MAP}`);
  const readable = (m.flags & DmaMapFlags.READ) !== 0;
  const writable = (m.flags & DmaMapFlags.WRITE) !== 0;
  if (!readable && !writable) throw fail.inval("DMA_MAP without READ or WRITE");
  const table = req.endpoint.dmaTable;
  table.checkAdd(m.address, m.size);
  let memory = null;
  if (req.fds.length === 1) {
    const fd = req.fds[0]!;
    const fdSize = native.fstatSize(fd);
    if (fdSize >= 0n && m.offset + m.size > fdSize) {
      throw fail.inval(`DMA_MAP range [0x${m.offset.toString(16)}, +0x${m.size.toString(16)}) beyond the fd's 0x${fdSize.toString(16)} bytes`);
    }
    // the mapping keeps the memory; the fd itself is closed with the request's other fds
    memory = mapFd(fd, m.offset, m.size, writable);
  }
  table.add({ iova: m.address, size: m.size, offset: m.offset, readable, writable, memory });
  req.log.debug({ iova: m.address, size: m.size, fd: memory !== null }, "DMA region mapped");
  return reply(encodeDmaMapReply());
}

export function handleDmaUnmap(req: Request): Reply {
  const m = decodeDmaUnmapRequest(req.body);
  const table = req.endpoint.dmaTable;
  if (m.flags & DmaUnmapFlags.ALL) {
    req.session.conformance?.note("dma-unmap-all", req.header, 4, "DMA_UNMAP with linux/vfio.h's VFIO_DMA_UNMAP_FLAG_ALL");
    // spec: with the ALL flag, address and size must be 0
    if (m.address !== 0n || m.size !== 0n) throw fail.inval("DMA_UNMAP ALL with a non-zero address or size");
    table.removeAll();
  } else {
    table.remove(m.address, m.size);
  }
  return reply(encodeDmaUnmapReply({ argsz: m.argsz, flags: m.flags, address: m.address, size: m.size }));
}

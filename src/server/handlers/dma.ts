/** DMA_MAP / DMA_UNMAP: the client's memory the device may use (spec: "VFIO_USER_DMA_MAP"). */
import { DmaMapFlags, DmaUnmapFlags, MessageSize } from "../../../protocol/constants.ts";
import { fail } from "../../../protocol/errors.ts";
import { decodeDmaMapRequest, encodeDmaMapReply } from "../../../protocol/messages/dma-map.ts";
import { decodeDmaUnmapRequest, encodeDmaUnmapReply } from "../../../protocol/messages/dma-unmap.ts";
import type { DmaRegion } from "../../dma/dma-table.ts";
import { GuestWindow } from "../../dma/guest-window.ts";
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
    memory = new GuestWindow(mapFd(fd, m.offset, m.size, writable));
  }
  table.add({ iova: m.address, size: m.size, offset: m.offset, readable, writable, memory });
  req.log.debug({ iova: m.address, size: m.size, fd: memory !== null }, "DMA region mapped");
  return reply(encodeDmaMapReply());
}

export function handleDmaUnmap(req: Request): Reply | Promise<Reply> {
  const m = decodeDmaUnmapRequest(req.body);
  const table = req.endpoint.dmaTable;
  const all = (m.flags & DmaUnmapFlags.ALL) !== 0;
  if (all) req.session.conformance?.note("dma-unmap-all", req.header, 4, "DMA_UNMAP with linux/vfio.h's VFIO_DMA_UNMAP_FLAG_ALL");
  // spec: with the ALL flag, address and size must be 0
  if (all && (m.address !== 0n || m.size !== 0n)) throw fail.inval("DMA_UNMAP ALL with a non-zero address or size");
  const done = (): Reply => {
    if (all) table.removeAll();
    else table.remove(m.address, m.size);
    return reply(encodeDmaUnmapReply({ argsz: m.argsz, flags: m.flags, address: m.address, size: m.size }));
  };
  // spec: "the server must release all references to that DMA region before
  // replying, which potentially includes in-flight DMA transactions": views a
  // device still holds (a file read into guest memory) are waited for
  const busy = heldWindows(all ? Array.from(table.regions()) : exactRegion(req, m.address, m.size));
  if (busy.length === 0) return done();
  for (const w of busy) w.close();
  req.log.debug({ iova: m.address, size: m.size, windows: busy.length }, "DMA_UNMAP waits for views the device holds");
  return Promise.all(busy.map((w) => w.idle())).then(done);
}

/** The region with exactly this iova and size, if any (remove() gives the ENOENT otherwise). */
function exactRegion(req: Request, iova: bigint, size: bigint): DmaRegion[] {
  let r: DmaRegion;
  try {
    r = req.endpoint.dmaTable.lookup(iova, 1n);
  } catch {
    return [];
  }
  return r.iova === iova && r.size === size ? [r] : [];
}

function heldWindows(regions: readonly DmaRegion[]): GuestWindow[] {
  const out: GuestWindow[] = [];
  for (const r of regions) if (r.memory instanceof GuestWindow && r.memory.pinned > 0) out.push(r.memory);
  return out;
}

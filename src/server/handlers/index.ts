/** The handler table: every command the server serves, and who serves it. */
import { Command } from "../../../protocol/constants.ts";
import type { Handler, HandlerTable } from "../dispatcher.ts";
import { handleDeviceGetInfo, handleDeviceGetIrqInfo, handleDeviceGetRegionInfo, handleDeviceGetRegionIoFds } from "./device-info.ts";
import { handleDmaMap, handleDmaUnmap } from "./dma.ts";
import { handleDeviceFeature } from "./feature.ts";
import { handleMigDataRead, handleMigDataWrite, handleMigGetPrecopyInfo } from "./migration-data.ts";
import { handleDeviceSetIrqs } from "./irqs.ts";
import { handleRegionRead, handleRegionWrite, handleRegionWriteMulti } from "./region-access.ts";
import { handleDeviceReset } from "./reset.ts";
import { handleVersion } from "./version.ts";

export function buildHandlerTable(extra: Iterable<[number, Handler]> = []): HandlerTable {
  return new Map<number, Handler>([
    [Command.VERSION, handleVersion],
    [Command.DMA_MAP, handleDmaMap],
    [Command.DMA_UNMAP, handleDmaUnmap],
    [Command.DEVICE_GET_INFO, handleDeviceGetInfo],
    [Command.DEVICE_GET_REGION_INFO, handleDeviceGetRegionInfo],
    [Command.DEVICE_GET_REGION_IO_FDS, handleDeviceGetRegionIoFds],
    [Command.DEVICE_GET_IRQ_INFO, handleDeviceGetIrqInfo],
    [Command.DEVICE_SET_IRQS, handleDeviceSetIrqs],
    [Command.REGION_READ, handleRegionRead],
    [Command.REGION_WRITE, handleRegionWrite],
    [Command.REGION_WRITE_MULTI, handleRegionWriteMulti],
    [Command.DEVICE_RESET, handleDeviceReset],
    [Command.DEVICE_FEATURE, handleDeviceFeature],
    [Command.MIG_DATA_READ, handleMigDataRead],
    [Command.MIG_DATA_WRITE, handleMigDataWrite],
    [Command.MIG_GET_PRECOPY_INFO, handleMigGetPrecopyInfo],
    ...extra,
  ]);
}

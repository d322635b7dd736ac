/**
 * The vfio-user wire: constants, header, one codec per message, the VERSION
 * capabilities JSON and the frame decoder. Pure: no sockets, no logging.
 */
export * from "./constants.ts";
export * from "./errors.ts";
export * from "./u64.ts";
export * from "./header.ts";
export * from "./capabilities.ts";
export * from "./frame.ts";
export { asBuffer, viewOf } from "./wire.ts";
export * from "./messages/version.ts";
export * from "./messages/dma-map.ts";
export * from "./messages/dma-unmap.ts";
export * from "./messages/device-get-info.ts";
export * from "./messages/device-get-region-info.ts";
export * from "./messages/device-get-region-io-fds.ts";
export * from "./messages/device-get-irq-info.ts";
export * from "./messages/device-set-irqs.ts";
export * from "./messages/region-read.ts";
export * from "./messages/region-write.ts";
export * from "./messages/dma-read.ts";
export * from "./messages/dma-write.ts";
export * from "./messages/device-reset.ts";
export * from "./messages/region-write-multi.ts";
export * from "./messages/device-feature.ts";
export * from "./messages/device-feature-data.ts";
export * from "./messages/mig-data.ts";
export * from "./messages/mig-get-precopy-info.ts";
export * from "./pending-requests.ts";

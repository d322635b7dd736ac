/**
 * The vfio-user client, for device developers and for migrating a device
 * between servers: `import { VfioUserClient } from "vfio-user-ts/client"`.
 */
export {
  VfioUserClient,
  ConnectionClosedError,
  RequestTimeoutError,
  DEFAULT_REQUEST_TIMEOUT_MS,
  CLIENT_MAX_DATA_XFER_SIZE,
  CLIENT_MAX_MSG_FDS,
  createEventfd,
  closeFd,
  readEventfd,
  waitEventfd,
  stateName,
  type ClientOptions,
  type DmaMapOptions,
  type RegionWriteOptions,
  type MigStateReply,
  type PrecopyInfo,
  type FeatureReply,
  type SocketDmaStats,
} from "./client.ts";
export { GuestMemory, GUEST_PAGE_SIZE, pagesOfBitmap, type GuestMemoryOptions } from "./guest-memory.ts";
export {
  MigrationDriver,
  MigrationError,
  MigrationCancelledError,
  type MigrationSide,
  type MigrationDriverOptions,
  type AttachInfo,
  type SideInfo,
  type RoundStats,
  type MigrationResult,
  type MigrationProgress,
  type MigrationPhase,
  type DowntimeBreakdown,
} from "./migration-driver.ts";
export { VfioUserError } from "../../protocol/errors.ts";
export { MigState, MigrationFlags, Feature, FeatureFlags, RegionIndex, IrqIndex, Errno } from "../../protocol/constants.ts";

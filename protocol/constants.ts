/**
 * Wire constants of vfio-user (spec: docs/interop/vfio-user.rst in qemu/qemu)
 * and of the VFIO structures it reuses (include/uapi/linux/vfio.h in Linux).
 * Names keep the spec's spelling so code and spec can be grepped together.
 */

/** Message types (spec: "Commands"). */
export const Command = {
  VERSION: 1,
  DMA_MAP: 2,
  DMA_UNMAP: 3,
  DEVICE_GET_INFO: 4,
  DEVICE_GET_REGION_INFO: 5,
  DEVICE_GET_REGION_IO_FDS: 6,
  DEVICE_GET_IRQ_INFO: 7,
  DEVICE_SET_IRQS: 8,
  REGION_READ: 9,
  REGION_WRITE: 10,
  DMA_READ: 11,
  DMA_WRITE: 12,
  DEVICE_RESET: 13,
  REGION_WRITE_MULTI: 15,
  DEVICE_FEATURE: 16,
  MIG_DATA_READ: 17,
  MIG_DATA_WRITE: 18,
  /** Extension of this project (not in the spec): VFIO_MIG_GET_PRECOPY_INFO over the socket. */
  MIG_GET_PRECOPY_INFO: 19,
} as const;
export type Command = (typeof Command)[keyof typeof Command];

export const COMMAND_NAMES: Readonly<Record<number, string>> = Object.fromEntries(
  Object.entries(Command).map(([name, value]) => [value, name]),
);

export function isKnownCommand(value: number): value is Command {
  return COMMAND_NAMES[value] !== undefined;
}

/** Header: msg_id u16, command u16, size u32, flags u32, error u32. */
export const HEADER_SIZE = 16;

/** Header flags (spec: "Header"). Bits 0-3 are the message type. */
export const HeaderFlags = {
  TYPE_MASK: 0xf,
  TYPE_COMMAND: 0,
  TYPE_REPLY: 1,
  NO_REPLY: 1 << 4,
  ERROR: 1 << 5,
} as const;

/** Linux errno values carried in the header's error field. */
export const Errno = {
  EPERM: 1,
  ENOENT: 2,
  EIO: 5,
  E2BIG: 7,
  EBADF: 9,
  EAGAIN: 11,
  ENOMEM: 12,
  EFAULT: 14,
  EBUSY: 16,
  EEXIST: 17,
  EINVAL: 22,
  ENOSPC: 28,
  ERANGE: 34,
  ENOSYS: 38,
  EPROTO: 71,
  EMSGSIZE: 90,
  ENOTSUP: 95,
} as const;

/** Protocol version this server speaks (spec: "Version"). */
export const PROTOCOL_MAJOR = 0;
export const PROTOCOL_MINOR = 0;

/** Defaults from the spec's capability table when the client omits them. */
export const Defaults = {
  MAX_MSG_FDS: 1,
  MAX_DATA_XFER_SIZE: 1048576,
  PGSIZE: 4096,
  MAX_DMA_MAPS: 65535,
} as const;

/** DMA_MAP flags. */
export const DmaMapFlags = {
  READ: 1 << 0,
  WRITE: 1 << 1,
} as const;

/** DMA_UNMAP flags. */
export const DmaUnmapFlags = {
  /** Unmap every region; address and size must be 0. */
  ALL: 1 << 1,
} as const;

/** DEVICE_GET_INFO flags (VFIO_DEVICE_FLAGS_*). */
export const DeviceInfoFlags = {
  RESET: 1 << 0,
  PCI: 1 << 1,
} as const;

/** PCI region indices (VFIO_PCI_*_REGION_INDEX). */
export const RegionIndex = {
  BAR0: 0,
  BAR1: 1,
  BAR2: 2,
  BAR3: 3,
  BAR4: 4,
  BAR5: 5,
  ROM: 6,
  CONFIG: 7,
  VGA: 8,
  NUM_REGIONS: 9,
} as const;

/** GET_REGION_INFO flags (VFIO_REGION_INFO_FLAG_*). */
export const RegionInfoFlags = {
  READ: 1 << 0,
  WRITE: 1 << 1,
  MMAP: 1 << 2,
  CAPS: 1 << 3,
} as const;

/** Region info capability ids (VFIO_REGION_INFO_CAP_*). */
export const RegionCapId = {
  SPARSE_MMAP: 1,
  TYPE: 2,
} as const;

/** PCI IRQ indices (VFIO_PCI_*_IRQ_INDEX). */
export const IrqIndex = {
  INTX: 0,
  MSI: 1,
  MSIX: 2,
  ERR: 3,
  REQ: 4,
  NUM_IRQS: 5,
} as const;

/** GET_IRQ_INFO flags (VFIO_IRQ_INFO_*). */
export const IrqInfoFlags = {
  EVENTFD: 1 << 0,
  MASKABLE: 1 << 1,
  AUTOMASKED: 1 << 2,
  NORESIZE: 1 << 3,
} as const;

/** SET_IRQS flags (VFIO_IRQ_SET_*). */
export const IrqSetFlags = {
  DATA_NONE: 1 << 0,
  DATA_BOOL: 1 << 1,
  DATA_EVENTFD: 1 << 2,
  ACTION_MASK: 1 << 3,
  ACTION_UNMASK: 1 << 4,
  ACTION_TRIGGER: 1 << 5,
  DATA_TYPE_MASK: 0x7,
  ACTION_TYPE_MASK: 0x38,
} as const;

/** DEVICE_FEATURE flags (VFIO_DEVICE_FEATURE_*). */
export const FeatureFlags = {
  MASK: 0xffff,
  GET: 1 << 16,
  SET: 1 << 17,
  PROBE: 1 << 18,
} as const;

/** Feature numbers (VFIO_DEVICE_FEATURE_*). */
export const Feature = {
  PCI_VF_TOKEN: 0,
  MIGRATION: 1,
  MIG_DEVICE_STATE: 2,
  LOW_POWER_ENTRY: 3,
  LOW_POWER_ENTRY_WITH_WAKEUP: 4,
  LOW_POWER_EXIT: 5,
  DMA_LOGGING_START: 6,
  DMA_LOGGING_STOP: 7,
  DMA_LOGGING_REPORT: 8,
  MIG_DATA_SIZE: 9,
  CLEAR_MASTER_BIT: 10,
} as const;

/** VFIO_DEVICE_FEATURE_MIGRATION flags. */
export const MigrationFlags = {
  STOP_COPY: 1n << 0n,
  P2P: 1n << 1n,
  PRE_COPY: 1n << 2n,
} as const;

/** enum vfio_device_mig_state. */
export const MigState = {
  ERROR: 0,
  STOP: 1,
  RUNNING: 2,
  STOP_COPY: 3,
  RESUMING: 4,
  RUNNING_P2P: 5,
  PRE_COPY: 6,
  PRE_COPY_P2P: 7,
} as const;
export type MigState = (typeof MigState)[keyof typeof MigState];
export const MIG_STATE_COUNT = 8;

export const MIG_STATE_NAMES: Readonly<Record<number, string>> = Object.fromEntries(
  Object.entries(MigState).map(([name, value]) => [value, name]),
);

/** data_fd in a MIG_DEVICE_STATE reply: vfio-user moves data in-band only. */
export const NO_DATA_FD = -1;

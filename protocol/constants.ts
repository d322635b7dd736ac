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

/** Header flags (spec: "Header"). Bits 0-3 are the message type; bits 6-31 are not defined. */
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
  /** QEMU's client answers a DMA access that decodes to nothing with it. */
  ENODEV: 19,
  EINVAL: 22,
  ENOSPC: 28,
  ERANGE: 34,
  ENOSYS: 38,
  /** vfio.h: read() of a migration data fd at a temporary end of stream. */
  ENOMSG: 42,
  EPROTO: 71,
  EOVERFLOW: 75,
  EMSGSIZE: 90,
  /** Linux ENOTSUP == EOPNOTSUPP. */
  ENOTSUP: 95,
} as const;

/** Protocol version this server speaks (spec: "Version"; QEMU's VFIO_USER_MAJOR_VER/MINOR_VER). */
export const PROTOCOL_MAJOR = 0;
export const PROTOCOL_MINOR = 0;

/** Key names of the VERSION JSON (spec: "Version", capability tables). */
export const CapabilityName = {
  /** Top-level object holding all the others. */
  CAPABILITIES: "capabilities",
  MAX_MSG_FDS: "max_msg_fds",
  MAX_DATA_XFER_SIZE: "max_data_xfer_size",
  MAX_DMA_MAPS: "max_dma_maps",
  PGSIZES: "pgsizes",
  TWIN_SOCKET: "twin_socket",
  WRITE_MULTIPLE: "write_multiple",
  /** Not in the current spec table; QEMU's VFIO_USER_CAP_MIGR. */
  MIGRATION: "migration",
  /** Members of `migration` (QEMU's VFIO_USER_CAP_PGSIZE / _MAX_BITMAP). */
  PGSIZE: "pgsize",
  MAX_BITMAP_SIZE: "max_bitmap_size",
  /** Members of `twin_socket`. */
  SUPPORTED: "supported",
  FD_INDEX: "fd_index",
} as const;

/** Defaults from the spec's capability table when the client omits them. */
export const Defaults = {
  MAX_MSG_FDS: 1,
  MAX_DATA_XFER_SIZE: 1048576,
  PGSIZE: 4096,
  MAX_DMA_MAPS: 65535,
  /** `migration.pgsize` when absent (QEMU's VFIO_USER_DEF_PGSIZE; the spec has no default). */
  MIGRATION_PGSIZE: 4096,
  /** `migration.max_bitmap_size` when absent (QEMU's VFIO_USER_DEF_MAX_BITMAP, 256 MiB). */
  MAX_BITMAP_SIZE: 256 * 1024 * 1024,
} as const;

/**
 * Sizes in bytes of the fixed parts of message bodies (after the 16-byte
 * header) and of the structures inside them, from the spec's layout tables.
 */
export const MessageSize = {
  /** VERSION: major u16, minor u16; the JSON data follows. */
  VERSION_FIXED: 4,
  /** DMA_MAP request: argsz, flags, offset, address, size. */
  DMA_MAP: 32,
  /** DMA_UNMAP request and reply: argsz, flags, address, size. */
  DMA_UNMAP: 24,
  /** DEVICE_GET_INFO request and reply: argsz, flags, num_regions, num_irqs. */
  DEVICE_INFO: 16,
  /** DEVICE_GET_REGION_INFO request and reply fixed part (struct vfio_region_info). */
  REGION_INFO: 32,
  /** DEVICE_GET_REGION_IO_FDS request and reply fixed part: argsz, flags, index, count. */
  REGION_IO_FDS_FIXED: 16,
  /** One sub-region entry of the IO_FDS reply (both ioeventfd and ioregionfd forms). */
  SUB_REGION_IO_FD: 40,
  /** DEVICE_GET_IRQ_INFO request and reply: argsz, flags, index, count. */
  IRQ_INFO: 16,
  /** DEVICE_SET_IRQS fixed part: argsz, flags, index, start, count. */
  IRQ_SET_FIXED: 20,
  /** REGION_READ/WRITE fixed part: offset u64, region u32, count u32. */
  REGION_ACCESS_FIXED: 16,
  /** DMA_READ/WRITE fixed part: address u64, count u64. */
  DMA_ACCESS_FIXED: 16,
  /** DMA_WRITE reply: address u64, count u32 (spec table gives count 4 bytes here). */
  DMA_WRITE_REPLY: 12,
  /** REGION_WRITE_MULTI: wr_cnt u64, then the entries. */
  REGION_WRITE_MULTI_FIXED: 8,
  /** One REGION_WRITE_MULTI entry: offset u64, region u32, count u32, data[8]. */
  REGION_WRITE_MULTI_ENTRY: 24,
  /** REGION_WRITE_MULTI reply: wr_cnt u64. */
  REGION_WRITE_MULTI_REPLY: 8,
  /** DEVICE_FEATURE fixed part: argsz, flags; the feature data follows. */
  DEVICE_FEATURE_FIXED: 8,
  /** MIG_DATA_READ/WRITE fixed part: argsz, size. */
  MIG_DATA_FIXED: 8,
  /** MIG_GET_PRECOPY_INFO request (extension): argsz, flags. */
  PRECOPY_INFO_REQUEST: 8,
  /** MIG_GET_PRECOPY_INFO reply (extension): struct vfio_precopy_info. */
  PRECOPY_INFO: 24,
  /** struct vfio_info_cap_header: id u16, version u16, next u32. */
  CAP_HEADER: 8,
  /** Sparse mmap capability up to its areas: header, nr_areas u32, reserved u32. */
  SPARSE_MMAP_CAP_FIXED: 16,
  /** struct vfio_region_sparse_mmap_area: offset u64, size u64. */
  SPARSE_MMAP_AREA: 16,
  /** struct vfio_region_info_cap_type: header, type u32, subtype u32. */
  TYPE_CAP: 16,
  /** struct vfio_device_feature_migration: flags u64. */
  FEATURE_MIGRATION: 8,
  /** struct vfio_device_feature_mig_state: device_state u32, data_fd s32. */
  FEATURE_MIG_STATE: 8,
  /** DMA logging START/STOP data up to its ranges: page_size u64, num_ranges u32, reserved u32. */
  DMA_LOGGING_CONTROL_FIXED: 16,
  /** One DMA logging range: iova u64, length u64. */
  DMA_LOGGING_RANGE: 16,
  /** DMA_LOGGING_REPORT data up to the bitmap: iova, length, page_size (u64 each). */
  DMA_LOGGING_REPORT_FIXED: 24,
  /** struct vfio_device_feature_mig_data_size: stop_copy_length u64. */
  FEATURE_MIG_DATA_SIZE: 8,
} as const;

/**
 * REGION_WRITE_MULTI limits. The spec fixes the entry's data field at 8
 * bytes ("can only describe writes of 8 bytes or less") but names no entry
 * limit; 200 is the array size QEMU's client uses (VFIO_USER_MULTI_MAX).
 */
export const REGION_WRITE_MULTI_DATA = 8;
export const REGION_WRITE_MULTI_MAX = 200;

/** DMA_MAP flags. */
export const DmaMapFlags = {
  READ: 1 << 0,
  WRITE: 1 << 1,
} as const;

/**
 * DMA_UNMAP flags. The spec says "flags is unused in this version", but
 * QEMU's client sends VFIO_DMA_UNMAP_FLAG_ALL from vfio.h (with address and
 * size 0) when the whole address space goes away, so that bit is accepted.
 */
export const DmaUnmapFlags = {
  /** vfio.h VFIO_DMA_UNMAP_FLAG_ALL: unmap every region; address and size must be 0. */
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
  MSIX_MAPPABLE: 3,
} as const;

/** Capability versions this codec writes (spec: "VFIO sparse mmap cap header": version 0x1). */
export const RegionCapVersion = {
  SPARSE_MMAP: 1,
  TYPE: 1,
} as const;

/** Region types for the TYPE capability (VFIO_REGION_TYPE_*). */
export const RegionType = {
  PCI_VENDOR_TYPE: 0x8000_0000,
  PCI_VENDOR_MASK: 0xffff,
  GFX: 1,
  CCW: 2,
  MIGRATION_DEPRECATED: 3,
} as const;

/** Sub-region notification types of DEVICE_GET_REGION_IO_FDS (VFIO_USER_IO_FD_TYPE_*). */
export const IoFdType = {
  IOEVENTFD: 0,
  IOREGIONFD: 1,
} as const;

/** Flags of an ioeventfd sub-region (KVM_IOEVENTFD_FLAG_* in linux/kvm.h). */
export const IoeventfdFlags = {
  DATAMATCH: 1 << 0,
  PIO: 1 << 1,
  VIRTIO_CCW_NOTIFY: 1 << 3,
} as const;

/** Flags of an ioregionfd sub-region (KVM_IOREGION_*, from the unmerged KVM proposal the spec cites). */
export const IoregionfdFlags = {
  PIO: 1 << 0,
  POSTED_WRITES: 1 << 1,
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

/** DEVICE_FEATURE flags (VFIO_DEVICE_FEATURE_*). Bits 19-31 are not defined. */
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
  /** vfio.h VFIO_DEVICE_FEATURE_BUS_MASTER (op CLEAR_MASTER 0 / SET_MASTER 1). */
  BUS_MASTER: 10,
} as const;

/** VFIO_DEVICE_FEATURE_MIGRATION flags (a u64 on the wire, so bigint). */
export const MigrationFlags = {
  STOP_COPY: 1n << 0n,
  P2P: 1n << 1n,
  PRE_COPY: 1n << 2n,
} as const;

/** enum vfio_device_mig_state (spec: RUNNING_P2P and PRE_COPY_P2P are "not used in vfio-user"). */
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

/**
 * Numbers from the virtio 1.x specification (OASIS virtio-v1.2) this device
 * uses, named as the spec and Linux's include/uapi/linux/virtio_*.h spell
 * them: "Virtio Over PCI Bus" (4.1), "Split Virtqueues" (2.7), "Block
 * Device" (5.2).
 */

/** PCI identity of a modern (non-transitional) virtio device (spec: 4.1.2.1). */
export const VIRTIO_PCI_VENDOR_ID = 0x1af4;
/** 0x1040 + virtio device ID. */
export const VIRTIO_PCI_MODERN_DEVICE_BASE = 0x1040;
export const VIRTIO_ID_BLOCK = 2;

/** Device status bits (spec: 2.1). */
export const Status = {
  ACKNOWLEDGE: 1,
  DRIVER: 2,
  DRIVER_OK: 4,
  FEATURES_OK: 8,
  DEVICE_NEEDS_RESET: 64,
  FAILED: 128,
} as const;

/** Device-independent feature bits (spec: 6). */
export const Feature = {
  RING_INDIRECT_DESC: 28,
  RING_EVENT_IDX: 29,
  VERSION_1: 32,
} as const;

/** Block feature bits (spec: 5.2.3). */
export const BlkFeature = {
  SIZE_MAX: 1,
  SEG_MAX: 2,
  GEOMETRY: 4,
  RO: 5,
  BLK_SIZE: 6,
  FLUSH: 9,
  TOPOLOGY: 10,
  CONFIG_WCE: 11,
  MQ: 12,
  DISCARD: 13,
  WRITE_ZEROES: 14,
} as const;

/** virtio_pci_cap cfg_type (spec: 4.1.4). */
export const PciCapType = {
  COMMON_CFG: 1,
  NOTIFY_CFG: 2,
  ISR_CFG: 3,
  DEVICE_CFG: 4,
  PCI_CFG: 5,
} as const;

/** struct virtio_pci_cap and its extensions (spec: 4.1.4). */
export const PciCap = {
  CAP_VNDR: 0,
  CAP_NEXT: 1,
  CAP_LEN: 2,
  CFG_TYPE: 3,
  BAR: 4,
  ID: 5,
  OFFSET: 8,
  LENGTH: 12,
  SIZEOF: 16,
  /** virtio_pci_notify_cap: notify_off_multiplier. */
  NOTIFY_OFF_MULTIPLIER: 16,
  NOTIFY_SIZEOF: 20,
  /** virtio_pci_cfg_cap: pci_cfg_data. */
  PCI_CFG_DATA: 16,
  PCI_CFG_SIZEOF: 20,
} as const;

/** struct virtio_pci_common_cfg (spec: 4.1.4.3), with the 1.2 fields after queue_device. */
export const CommonCfg = {
  DEVICE_FEATURE_SELECT: 0x00,
  DEVICE_FEATURE: 0x04,
  DRIVER_FEATURE_SELECT: 0x08,
  DRIVER_FEATURE: 0x0c,
  CONFIG_MSIX_VECTOR: 0x10,
  NUM_QUEUES: 0x12,
  DEVICE_STATUS: 0x14,
  CONFIG_GENERATION: 0x15,
  QUEUE_SELECT: 0x16,
  QUEUE_SIZE: 0x18,
  QUEUE_MSIX_VECTOR: 0x1a,
  QUEUE_ENABLE: 0x1c,
  QUEUE_NOTIFY_OFF: 0x1e,
  QUEUE_DESC: 0x20,
  QUEUE_DRIVER: 0x28,
  QUEUE_DEVICE: 0x30,
  QUEUE_NOTIF_CONFIG_DATA: 0x38,
  QUEUE_RESET: 0x3a,
  ADMIN_QUEUE_INDEX: 0x3c,
  ADMIN_QUEUE_NUM: 0x3e,
  SIZEOF: 0x40,
} as const;

/** "No vector" in config_msix_vector / queue_msix_vector (spec: 4.1.5.1.2). */
export const VIRTIO_MSI_NO_VECTOR = 0xffff;

/** ISR status bits (spec: 4.1.4.5). */
export const Isr = {
  QUEUE: 1,
  CONFIG: 2,
} as const;

/** Split virtqueue descriptor flags and layout (spec: 2.7.5). */
export const Desc = {
  F_NEXT: 1,
  F_WRITE: 2,
  F_INDIRECT: 4,
  SIZEOF: 16,
} as const;

/** Ring flags (spec: 2.7.7, 2.7.10). */
export const VRING_AVAIL_F_NO_INTERRUPT = 1;
export const VRING_USED_F_NO_NOTIFY = 1;
/** Bytes of one used ring element (id u32, len u32). */
export const USED_ELEM_SIZEOF = 8;

/** Block request types (spec: 5.2.6). */
export const BlkType = {
  IN: 0,
  OUT: 1,
  FLUSH: 4,
  GET_ID: 8,
  GET_LIFETIME: 10,
  DISCARD: 11,
  WRITE_ZEROES: 13,
  SECURE_ERASE: 14,
} as const;

/** Block request status (spec: 5.2.6). */
export const BlkStatus = {
  OK: 0,
  IOERR: 1,
  UNSUPP: 2,
} as const;

/** struct virtio_blk_outhdr: type u32, reserved (ioprio) u32, sector u64. */
export const BLK_OUTHDR_SIZEOF = 16;
/** Sectors are 512 bytes whatever blk_size says (spec: 5.2.6). */
export const SECTOR_SIZE = 512;
/** The GET_ID string: up to 20 bytes, NUL-padded (spec: 5.2.6). */
export const VIRTIO_BLK_ID_BYTES = 20;

/** struct virtio_blk_config (spec: 5.2.4), through the 1.2 zoned fields: 96 bytes. */
export const BlkConfig = {
  CAPACITY: 0,
  SIZE_MAX: 8,
  SEG_MAX: 12,
  GEOMETRY: 16,
  BLK_SIZE: 20,
  TOPOLOGY: 24,
  WRITEBACK: 32,
  NUM_QUEUES: 34,
  SIZEOF: 96,
} as const;

/** Whether feature bit `bit` is set in `features`. */
export function hasFeature(features: bigint, bit: number): boolean {
  return ((features >> BigInt(bit)) & 1n) === 1n;
}

/** spec: 2.7.10.2, vring_need_event(event_idx, new_idx, old_idx) over u16. */
export function vringNeedEvent(eventIdx: number, newIdx: number, oldIdx: number): boolean {
  return ((newIdx - eventIdx - 1) & 0xffff) < ((newIdx - oldIdx) & 0xffff);
}

/**
 * Offsets and bit names of the PCI type-0 configuration header and of the
 * capability structures this framework builds. Names keep the spelling of
 * Linux include/uapi/linux/pci_regs.h (without the `PCI_` prefix and grouped
 * by register) so code and header can be grepped together.
 */

/** Size of conventional configuration space. */
export const PCI_CONFIG_SPACE_SIZE = 0x100;
/** Size of PCI Express extended configuration space. */
export const PCIE_CONFIG_SPACE_SIZE = 0x1000;

/** Type-0 header offsets (spec: PCI Local Bus 3.0, 6.1). */
export const PciHeader = {
  VENDOR_ID: 0x00,
  DEVICE_ID: 0x02,
  COMMAND: 0x04,
  STATUS: 0x06,
  REVISION_ID: 0x08,
  /** Programming interface, low byte of the 24-bit class code. */
  CLASS_PROG: 0x09,
  /** Sub-class (0x0a) and base class (0x0b). */
  CLASS_DEVICE: 0x0a,
  CACHE_LINE_SIZE: 0x0c,
  LATENCY_TIMER: 0x0d,
  HEADER_TYPE: 0x0e,
  BIST: 0x0f,
  BASE_ADDRESS_0: 0x10,
  BASE_ADDRESS_1: 0x14,
  BASE_ADDRESS_2: 0x18,
  BASE_ADDRESS_3: 0x1c,
  BASE_ADDRESS_4: 0x20,
  BASE_ADDRESS_5: 0x24,
  CARDBUS_CIS: 0x28,
  SUBSYSTEM_VENDOR_ID: 0x2c,
  SUBSYSTEM_ID: 0x2e,
  ROM_ADDRESS: 0x30,
  CAPABILITY_LIST: 0x34,
  INTERRUPT_LINE: 0x3c,
  INTERRUPT_PIN: 0x3d,
  MIN_GNT: 0x3e,
  MAX_LAT: 0x3f,
} as const;

/** Offset of BAR `index` (0..5). */
export function barOffset(index: number): number {
  return PciHeader.BASE_ADDRESS_0 + 4 * index;
}

/** Number of BAR slots in a type-0 header. */
export const PCI_NUM_BARS = 6;

/** Command register bits. */
export const PciCommand = {
  IO: 0x0001,
  MEMORY: 0x0002,
  MASTER: 0x0004,
  SPECIAL: 0x0008,
  INVALIDATE: 0x0010,
  VGA_PALETTE: 0x0020,
  PARITY: 0x0040,
  WAIT: 0x0080,
  SERR: 0x0100,
  FAST_BACK: 0x0200,
  INTX_DISABLE: 0x0400,
} as const;

/** Status register bits. */
export const PciStatus = {
  IMM_READY: 0x0001,
  /** Interrupt status: INTx asserted by the function. */
  INTERRUPT: 0x0008,
  CAP_LIST: 0x0010,
  MHZ66: 0x0020,
  UDF: 0x0040,
  FAST_BACK: 0x0080,
  /** Master data parity error. */
  PARITY: 0x0100,
  DEVSEL_MASK: 0x0600,
  SIG_TARGET_ABORT: 0x0800,
  REC_TARGET_ABORT: 0x1000,
  REC_MASTER_ABORT: 0x2000,
  SIG_SYSTEM_ERROR: 0x4000,
  DETECTED_PARITY: 0x8000,
} as const;

/** The status bits software clears by writing 1 (spec: PCI 3.0, 6.2.3). */
export const PCI_STATUS_ERROR_BITS =
  PciStatus.PARITY |
  PciStatus.SIG_TARGET_ABORT |
  PciStatus.REC_TARGET_ABORT |
  PciStatus.REC_MASTER_ABORT |
  PciStatus.SIG_SYSTEM_ERROR |
  PciStatus.DETECTED_PARITY;

/** Header type byte. */
export const PciHeaderType = {
  NORMAL: 0x00,
  BRIDGE: 0x01,
  CARDBUS: 0x02,
  MULTI_FUNCTION: 0x80,
} as const;

/** Low bits of a BAR (spec: PCI 3.0, 6.2.5.1). */
export const PciBaseAddress = {
  SPACE_IO: 0x01,
  SPACE_MEMORY: 0x00,
  MEM_TYPE_MASK: 0x06,
  MEM_TYPE_32: 0x00,
  MEM_TYPE_64: 0x04,
  MEM_PREFETCH: 0x08,
  MEM_MASK: 0xffff_fff0,
  IO_MASK: 0xffff_fffc,
} as const;

/** Capability IDs (spec: PCI Code and ID Assignment, 2). */
export const PciCapId = {
  PM: 0x01,
  MSI: 0x05,
  /** Vendor specific. */
  VNDR: 0x09,
  EXP: 0x10,
  MSIX: 0x11,
} as const;

/** Every capability starts with its ID and the next pointer. */
export const PciCap = {
  LIST_ID: 0,
  LIST_NEXT: 1,
  FLAGS: 2,
} as const;

/** Power management capability (spec: PCI PM 1.2, 3.2). */
export const PciPm = {
  PMC: 2,
  CTRL: 4,
  /** PMCSR bridge extensions. */
  PPB_EXTENSIONS: 6,
  DATA_REGISTER: 7,
  SIZEOF: 8,
  /** PMC: version field; 3 = PCI PM 1.2. */
  CAP_VER_MASK: 0x0007,
  CAP_D1: 0x0200,
  CAP_D2: 0x0400,
  CAP_PME_MASK: 0xf800,
  CTRL_STATE_MASK: 0x0003,
  CTRL_NO_SOFT_RESET: 0x0008,
  CTRL_PME_ENABLE: 0x0100,
  CTRL_PME_STATUS: 0x8000,
  D0: 0,
  D1: 1,
  D2: 2,
  D3HOT: 3,
} as const;

/** MSI capability, 64-bit layout (spec: PCI 3.0, 6.8.1). */
export const PciMsi = {
  FLAGS: 2,
  ADDRESS_LO: 4,
  ADDRESS_HI: 8,
  DATA_64: 12,
  MASK_64: 16,
  PENDING_64: 20,
  /** Size without per-vector masking (data at 12, 2 bytes, padded to a dword). */
  SIZEOF_64: 16,
  /** Size with mask and pending bits. */
  SIZEOF_64_MASK: 24,
  FLAGS_ENABLE: 0x0001,
  /** Multiple Message Capable, log2 of the vectors, bits 3:1. */
  FLAGS_QMASK: 0x000e,
  FLAGS_QMASK_SHIFT: 1,
  /** Multiple Message Enable, bits 6:4. */
  FLAGS_QSIZE: 0x0070,
  FLAGS_QSIZE_SHIFT: 4,
  FLAGS_64BIT: 0x0080,
  FLAGS_MASKBIT: 0x0100,
  /** The address is dword aligned: bits 1:0 are reserved. */
  ADDRESS_LO_MASK: 0xffff_fffc,
} as const;

/** MSI-X capability (spec: PCI 3.0, 6.8.2). */
export const PciMsix = {
  FLAGS: 2,
  TABLE: 4,
  PBA: 8,
  SIZEOF: 12,
  /** Table size minus one, bits 10:0. */
  FLAGS_QSIZE: 0x07ff,
  FLAGS_MASKALL: 0x4000,
  FLAGS_ENABLE: 0x8000,
  /** BAR indicator in the low 3 bits of the table/PBA dword. */
  BIR_MASK: 0x7,
  OFFSET_MASK: 0xffff_fff8,
  /** Largest table the 11-bit size field describes. */
  MAX_VECTORS: 2048,
  ENTRY_SIZE: 16,
  ENTRY_LOWER_ADDR: 0,
  ENTRY_UPPER_ADDR: 4,
  ENTRY_DATA: 8,
  ENTRY_VECTOR_CTRL: 12,
  ENTRY_CTRL_MASKBIT: 0x1,
} as const;

/** PCI Express capability, version 2 (spec: PCIe Base 3.0, 7.8). */
export const PciExp = {
  FLAGS: 0x02,
  DEVCAP: 0x04,
  DEVCTL: 0x08,
  DEVSTA: 0x0a,
  LNKCAP: 0x0c,
  LNKCTL: 0x10,
  LNKSTA: 0x12,
  SLTCAP: 0x14,
  SLTCTL: 0x18,
  SLTSTA: 0x1a,
  RTCTL: 0x1c,
  RTCAP: 0x1e,
  RTSTA: 0x20,
  DEVCAP2: 0x24,
  DEVCTL2: 0x28,
  DEVSTA2: 0x2a,
  LNKCAP2: 0x2c,
  LNKCTL2: 0x30,
  LNKSTA2: 0x32,
  SLTCAP2: 0x34,
  SLTCTL2: 0x38,
  SLTSTA2: 0x3a,
  /** Size of a version-2 endpoint capability. */
  SIZEOF_V2: 0x3c,

  FLAGS_VERS: 0x000f,
  FLAGS_VER2: 0x0002,
  FLAGS_TYPE: 0x00f0,
  FLAGS_TYPE_SHIFT: 4,
  TYPE_ENDPOINT: 0x0,

  DEVCAP_PAYLOAD: 0x0000_0007,
  /** Role-based error reporting: required since PCIe 1.1. */
  DEVCAP_RBER: 0x0000_8000,
  DEVCAP_FLR: 0x1000_0000,

  DEVCTL_CERE: 0x0001,
  DEVCTL_NFERE: 0x0002,
  DEVCTL_FERE: 0x0004,
  DEVCTL_URRE: 0x0008,
  DEVCTL_RELAX_EN: 0x0010,
  DEVCTL_PAYLOAD: 0x00e0,
  DEVCTL_EXT_TAG: 0x0100,
  DEVCTL_PHANTOM: 0x0200,
  DEVCTL_AUX_PME: 0x0400,
  DEVCTL_NOSNOOP_EN: 0x0800,
  DEVCTL_READRQ: 0x7000,
  DEVCTL_READRQ_512B: 0x2000,
  DEVCTL_BCR_FLR: 0x8000,

  DEVSTA_CED: 0x0001,
  DEVSTA_NFED: 0x0002,
  DEVSTA_FED: 0x0004,
  DEVSTA_URD: 0x0008,
  DEVSTA_AUXPD: 0x0010,
  DEVSTA_TRPND: 0x0020,

  LNKCAP_SLS: 0x0000_000f,
  LNKCAP_SLS_2_5GB: 0x0000_0001,
  LNKCAP_MLW: 0x0000_03f0,
  LNKCAP_MLW_SHIFT: 4,

  LNKCTL_ASPMC: 0x0003,
  LNKCTL_RCB: 0x0008,
  LNKCTL_CCC: 0x0040,
  LNKCTL_ES: 0x0080,

  LNKSTA_CLS: 0x000f,
  LNKSTA_CLS_2_5GB: 0x0001,
  LNKSTA_NLW: 0x03f0,
  LNKSTA_NLW_X1: 0x0010,
  LNKSTA_NLW_SHIFT: 4,

  LNKCAP2_SLS_2_5GB: 0x0000_0002,
  LNKCTL2_TLS: 0x000f,
  LNKCTL2_TLS_2_5GT: 0x0001,
} as const;

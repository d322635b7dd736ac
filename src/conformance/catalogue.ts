/**
 * The deviations a client can commit, by stable id: how severe each is (a
 * warning when the server accepts the message anyway, an error when it
 * refuses it or cannot serve it), the rule it breaks and where that rule is
 * written. Ids are part of the report's format: add, never rename.
 *
 * Sections name the vfio-user specification (docs/interop/vfio-user.rst in
 * QEMU) by its headings, or linux/vfio.h where vfio-user defers to VFIO.
 */
import { COMMAND_NAMES } from "../../protocol/constants.ts";

export type Severity = "warning" | "error";

export interface DeviationKind {
  readonly severity: Severity;
  /** What the client should have done, in a few words. */
  readonly rule: string;
  /** Where the rule is written; per command for rules every message has. */
  readonly section: string | ((command: string) => string);
}

/** The spec's heading of a command's section. */
function commandSection(command: string): string {
  return `vfio-user: VFIO_USER_${command}`;
}

const MIG_RULES = "linux/vfio.h: enum vfio_device_mig_state, vfio_mig_get_next_state; vfio-user: Direct/Complex State Transitions";

export const DEVIATIONS = {
  // ---- session and framing ----
  "version-missing": { severity: "error", rule: "the first message is VERSION", section: "vfio-user: Connection Initiation" },
  "version-repeated": { severity: "error", rule: "VERSION is sent once, first", section: "vfio-user: VFIO_USER_VERSION" },
  "unknown-command": { severity: "error", rule: "commands are those of the Commands table", section: "vfio-user: Commands" },
  "server-command": { severity: "error", rule: "DMA_READ/DMA_WRITE go from the server to the client", section: "vfio-user: Commands" },
  "bad-frame": { severity: "error", rule: "a header the stream can be framed by (size >= 16, <= the limit, type command or reply)", section: "vfio-user: Header" },
  "frame-incomplete": {
    severity: "error",
    rule: "a message's bytes all arrive (Message size is the size of the entire message)",
    section: "vfio-user: Header",
  },
  "header-reserved": { severity: "warning", rule: "the header's Error field is 0 in a command (reserved)", section: "vfio-user: Header" },

  // ---- sizes and fields ----
  "body-size": { severity: "error", rule: "the body has the size of the command's structure", section: commandSection },
  "argsz-too-small": { severity: "error", rule: "argsz can hold the fixed reply payload", section: () => "vfio-user: Message sizes" },
  "argsz-mismatch": { severity: "warning", rule: "DMA_MAP's argsz is the size of its structure (32)", section: () => "vfio-user: VFIO_USER_DMA_MAP" },
  "argsz-zero": {
    severity: "warning",
    rule: "argsz is set (the size of struct vfio_precopy_info, 24); 0 accepted as 24",
    section: () => "vfio-user-ts extension MIG_GET_PRECOPY_INFO (linux/vfio.h: struct vfio_precopy_info)",
  },
  "must-be-zero": { severity: "error", rule: "fields the spec reserves or says must be zero are zero", section: commandSection },
  "undefined-flags": { severity: "error", rule: "only defined flag bits are set", section: commandSection },
  "count-mismatch": { severity: "error", rule: "a count or size field matches the data carried", section: commandSection },
  "feature-get-data": {
    severity: "warning",
    rule: "GET and PROBE requests carry no data (GET's data is added in the reply; PROBE does not use it)",
    section: () => "vfio-user: VFIO_USER_DEVICE_FEATURE",
  },
  "dma-unmap-all": {
    severity: "warning",
    rule: "DMA_UNMAP flags are unused in this version; linux/vfio.h VFIO_DMA_UNMAP_FLAG_ALL accepted",
    section: () => "vfio-user: VFIO_USER_DMA_UNMAP",
  },

  // ---- DMA logging ----
  "dma-logging-ranges-not-inline": {
    severity: "error",
    rule: "DMA_LOGGING_START/STOP carry num_ranges {iova, length} inline at offset 16, not the ioctl's ranges pointer",
    section: () => "vfio-user: VFIO_DEVICE_FEATURE_DMA_LOGGING_START / VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP",
  },
  "dma-logging-report-size": {
    severity: "error",
    rule: "a DMA_LOGGING_REPORT request is iova, length, page_size (24 bytes); the bitmap comes back at offset 24 of the reply",
    section: () => "vfio-user: VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT",
  },
  "dma-logging-not-stopped": {
    severity: "warning",
    rule: "a client that started DMA logging stops it (DMA_LOGGING_STOP) before it leaves",
    section: () => "linux/vfio.h: VFIO_DEVICE_FEATURE_DMA_LOGGING_START / _STOP",
  },

  // ---- replies to the server's DMA_READ / DMA_WRITE ----
  "dma-reply-count": {
    severity: "error",
    rule: "a DMA_READ reply is address u64, count u64, then count bytes at offset 16; a DMA_WRITE reply echoes address and count",
    section: (command) => `vfio-user: VFIO_USER_${command} Reply`,
  },
  "dma-write-reply-empty": {
    severity: "warning",
    rule: "a DMA_WRITE reply carries address u64 and count u32; an empty one accepted",
    section: () => "vfio-user: VFIO_USER_DMA_WRITE Reply",
  },
  "fds-on-reply": { severity: "warning", rule: "replies to DMA_READ/DMA_WRITE carry no fds (closed)", section: (command) => `vfio-user: VFIO_USER_${command} Reply` },
  "reply-unmatched": {
    severity: "warning",
    rule: "a reply acknowledges a previous command with the same message ID (ignored)",
    section: () => "vfio-user: Header",
  },

  // ---- fds ----
  "fds-unexpected": {
    severity: "error",
    rule: "fds come only with DMA_MAP (one) and SET_IRQS with DATA_EVENTFD (count)",
    section: () => "vfio-user: VFIO_USER_DMA_MAP, VFIO_USER_DEVICE_SET_IRQS",
  },

  // ---- migration ----
  "mig-state-arc": { severity: "error", rule: "state requests the kernel's FSM takes (no ERROR, no STOP_COPY -> PRE_COPY, only offered states, nothing from ERROR but DEVICE_RESET)", section: () => MIG_RULES },
  "mig-data-read-state": { severity: "error", rule: "MIG_DATA_READ only in the saving group (PRE_COPY, STOP_COPY)", section: () => "vfio-user: VFIO_USER_MIG_DATA_READ" },
  "mig-data-write-state": { severity: "error", rule: "MIG_DATA_WRITE only in RESUMING", section: () => "vfio-user: VFIO_USER_MIG_DATA_WRITE" },
  "mig-data-read-after-end": {
    severity: "warning",
    rule: "no MIG_DATA_READ in STOP_COPY after one returned no data (the end of the stream); answered empty",
    section: () => "vfio-user: VFIO_USER_MIG_DATA_READ",
  },
  "precopy-info-state": {
    severity: "error",
    rule: "pre-copy info only in PRE_COPY states",
    section: () => "vfio-user-ts extension MIG_GET_PRECOPY_INFO (linux/vfio.h: VFIO_MIG_GET_PRECOPY_INFO)",
  },

  // ---- anything else the server refused ----
  "request-refused": { severity: "error", rule: "a request the server can serve (see the detail for its reason)", section: commandSection },
} as const satisfies Record<string, DeviationKind>;

export type DeviationId = keyof typeof DEVIATIONS;

export function isDeviationId(id: string): id is DeviationId {
  return Object.hasOwn(DEVIATIONS, id);
}

/** The section a deviation of `id` on `command` breaks. */
export function sectionOf(id: DeviationId, command: number): string {
  const s: DeviationKind["section"] = DEVIATIONS[id].section;
  return typeof s === "string" ? s : s(commandName(command));
}

export function commandName(command: number): string {
  return COMMAND_NAMES[command] ?? `command ${command}`;
}

/**
 * Malformed bodies are refused with VfioUserError and the errno the spec
 * implies (EINVAL throughout: every case is an invalid argument).
 */
import { describe, expect, it } from "vitest";
import {
  Errno,
  VfioUserError,
  decodeDeviceFeatureRequest,
  decodeDeviceGetInfoReply,
  decodeDeviceGetInfoRequest,
  decodeDeviceGetIrqInfoRequest,
  decodeDeviceGetRegionInfoReply,
  decodeDeviceGetRegionInfoRequest,
  decodeDeviceGetRegionIoFdsReply,
  decodeDeviceGetRegionIoFdsRequest,
  decodeDeviceResetRequest,
  decodeDeviceSetIrqsRequest,
  decodeDmaLoggingControl,
  decodeDmaLoggingReportReply,
  decodeDmaLoggingReportRequest,
  decodeDmaMapRequest,
  decodeDmaReadReply,
  decodeDmaReadRequest,
  decodeDmaUnmapRequest,
  decodeDmaWriteReply,
  decodeDmaWriteRequest,
  decodeFeatureMigDataSize,
  decodeFeatureMigState,
  decodeFeatureMigration,
  decodeMigDataReadReply,
  decodeMigDataReadRequest,
  decodeMigDataWriteRequest,
  decodeMigGetPrecopyInfoRequest,
  decodeRegionReadReply,
  decodeRegionReadRequest,
  decodeRegionWriteMultiRequest,
  decodeRegionWriteRequest,
  decodeVersion,
  decodeDmaMapReply,
  decodeDeviceSetIrqsReply,
  decodeMigDataWriteReply,
} from "../../../protocol/index.ts";
import { hex } from "./helpers.ts";

type Decoder = (body: Uint8Array) => unknown;

const Z8 = "0000000000000000";

/** [what, decoder, body hex, errno] */
const cases: [string, Decoder, string, number][] = [
  // VERSION
  ["VERSION: shorter than major+minor", decodeVersion, "000000", Errno.EINVAL],
  ["VERSION: data without NUL", decodeVersion, "0000 0000 7b7d", Errno.EINVAL],
  ["VERSION: NUL inside data", decodeVersion, "0000 0000 7b 00 7d 00", Errno.EINVAL],
  ["VERSION: invalid UTF-8", decodeVersion, "0000 0000 ff fe 00", Errno.EINVAL],

  // DMA_MAP
  ["DMA_MAP: short", decodeDmaMapRequest, `20000000 03000000 ${Z8} ${Z8}`, Errno.EINVAL],
  ["DMA_MAP: trailing bytes", decodeDmaMapRequest, `20000000 03000000 ${Z8} ${Z8} ${Z8} 00`, Errno.EINVAL],
  ["DMA_MAP: argsz below 32", decodeDmaMapRequest, `1f000000 03000000 ${Z8} ${Z8} ${Z8}`, Errno.EINVAL],
  ["DMA_MAP: unknown flag bit 2", decodeDmaMapRequest, `20000000 07000000 ${Z8} ${Z8} ${Z8}`, Errno.EINVAL],
  ["DMA_MAP reply: payload", decodeDmaMapReply, "00", Errno.EINVAL],

  // DMA_UNMAP
  ["DMA_UNMAP: short", decodeDmaUnmapRequest, `18000000 00000000 ${Z8}`, Errno.EINVAL],
  ["DMA_UNMAP: argsz below 24", decodeDmaUnmapRequest, `17000000 00000000 ${Z8} ${Z8}`, Errno.EINVAL],
  ["DMA_UNMAP: GET_DIRTY_BITMAP flag", decodeDmaUnmapRequest, `18000000 01000000 ${Z8} ${Z8}`, Errno.EINVAL],
  ["DMA_UNMAP: ALL with an address", decodeDmaUnmapRequest, `18000000 02000000 0010000000000000 ${Z8}`, Errno.EINVAL],
  ["DMA_UNMAP: ALL with a size", decodeDmaUnmapRequest, `18000000 02000000 ${Z8} 0010000000000000`, Errno.EINVAL],

  // DEVICE_GET_INFO
  ["GET_INFO: short", decodeDeviceGetInfoRequest, "10000000 00000000 00000000", Errno.EINVAL],
  ["GET_INFO: argsz below 16", decodeDeviceGetInfoRequest, "0f000000 00000000 00000000 00000000", Errno.EINVAL],
  ["GET_INFO: flags set", decodeDeviceGetInfoRequest, "10000000 01000000 00000000 00000000", Errno.EINVAL],
  ["GET_INFO: num_regions set", decodeDeviceGetInfoRequest, "10000000 00000000 09000000 00000000", Errno.EINVAL],
  ["GET_INFO: num_irqs set", decodeDeviceGetInfoRequest, "10000000 00000000 00000000 05000000", Errno.EINVAL],
  ["GET_INFO reply: long", decodeDeviceGetInfoReply, "10000000 00000000 00000000 00000000 00", Errno.EINVAL],

  // DEVICE_GET_REGION_INFO
  ["REGION_INFO: short", decodeDeviceGetRegionInfoRequest, `20000000 00000000 00000000 00000000 ${Z8}`, Errno.EINVAL],
  ["REGION_INFO: argsz below 32", decodeDeviceGetRegionInfoRequest, `1f000000 00000000 00000000 00000000 ${Z8} ${Z8}`, Errno.EINVAL],
  ["REGION_INFO: flags set", decodeDeviceGetRegionInfoRequest, `20000000 01000000 00000000 00000000 ${Z8} ${Z8}`, Errno.EINVAL],
  ["REGION_INFO: cap_offset set", decodeDeviceGetRegionInfoRequest, `20000000 00000000 00000000 20000000 ${Z8} ${Z8}`, Errno.EINVAL],
  ["REGION_INFO: size set", decodeDeviceGetRegionInfoRequest, `20000000 00000000 00000000 00000000 0100000000000000 ${Z8}`, Errno.EINVAL],
  ["REGION_INFO: offset set", decodeDeviceGetRegionInfoRequest, `20000000 00000000 00000000 00000000 ${Z8} 0000000001000000`, Errno.EINVAL],
  ["REGION_INFO reply: short", decodeDeviceGetRegionInfoReply, `20000000 00000000 00000000 00000000 ${Z8}`, Errno.EINVAL],
  [
    "REGION_INFO reply: cap_offset past the body",
    decodeDeviceGetRegionInfoReply,
    `30000000 08000000 00000000 40000000 ${Z8} ${Z8} 0200 0100 00000000 01000000 02000000`,
    Errno.EINVAL,
  ],
  [
    "REGION_INFO reply: cap_offset inside the fixed part",
    decodeDeviceGetRegionInfoReply,
    `30000000 08000000 00000000 10000000 ${Z8} ${Z8} 0200 0100 00000000 01000000 02000000`,
    Errno.EINVAL,
  ],
  [
    "REGION_INFO reply: next pointing backwards (loop)",
    decodeDeviceGetRegionInfoReply,
    `30000000 08000000 00000000 20000000 ${Z8} ${Z8} 0200 0100 20000000 01000000 02000000`,
    Errno.EINVAL,
  ],
  [
    "REGION_INFO reply: truncated type capability",
    decodeDeviceGetRegionInfoReply,
    `28000000 08000000 00000000 20000000 ${Z8} ${Z8} 0200 0100 00000000`,
    Errno.EINVAL,
  ],
  [
    "REGION_INFO reply: nr_areas larger than the capability",
    decodeDeviceGetRegionInfoReply,
    `40000000 08000000 00000000 20000000 ${Z8} ${Z8} 0100 0100 00000000 02000000 00000000 ${Z8} ${Z8}`,
    Errno.EINVAL,
  ],

  // DEVICE_GET_REGION_IO_FDS
  ["IO_FDS: short", decodeDeviceGetRegionIoFdsRequest, "10000000 00000000 00000000", Errno.EINVAL],
  ["IO_FDS: argsz below 16", decodeDeviceGetRegionIoFdsRequest, "0f000000 00000000 00000000 00000000", Errno.EINVAL],
  ["IO_FDS: flags set", decodeDeviceGetRegionIoFdsRequest, "10000000 01000000 00000000 00000000", Errno.EINVAL],
  ["IO_FDS: count set", decodeDeviceGetRegionIoFdsRequest, "10000000 00000000 00000000 01000000", Errno.EINVAL],
  [
    "IO_FDS reply: count disagrees with the array",
    decodeDeviceGetRegionIoFdsReply,
    `38000000 00000000 00000000 02000000 ${Z8} ${Z8} 00000000 00000000 00000000 00000000 ${Z8}`,
    Errno.EINVAL,
  ],
  [
    "IO_FDS reply: unknown sub-region type",
    decodeDeviceGetRegionIoFdsReply,
    `38000000 00000000 00000000 01000000 ${Z8} ${Z8} 00000000 02000000 00000000 00000000 ${Z8}`,
    Errno.EINVAL,
  ],

  // DEVICE_GET_IRQ_INFO
  ["IRQ_INFO: short", decodeDeviceGetIrqInfoRequest, "10000000 00000000", Errno.EINVAL],
  ["IRQ_INFO: argsz below 16", decodeDeviceGetIrqInfoRequest, "08000000 00000000 02000000 00000000", Errno.EINVAL],
  ["IRQ_INFO: flags set", decodeDeviceGetIrqInfoRequest, "10000000 01000000 02000000 00000000", Errno.EINVAL],
  ["IRQ_INFO: count set", decodeDeviceGetIrqInfoRequest, "10000000 00000000 02000000 01000000", Errno.EINVAL],

  // DEVICE_SET_IRQS
  ["SET_IRQS: short", decodeDeviceSetIrqsRequest, "14000000 24000000 02000000 00000000", Errno.EINVAL],
  ["SET_IRQS: argsz below 20", decodeDeviceSetIrqsRequest, "10000000 24000000 02000000 00000000 01000000", Errno.EINVAL],
  ["SET_IRQS: two DATA bits", decodeDeviceSetIrqsRequest, "14000000 26000000 02000000 00000000 01000000", Errno.EINVAL],
  ["SET_IRQS: no DATA bit", decodeDeviceSetIrqsRequest, "14000000 20000000 02000000 00000000 01000000", Errno.EINVAL],
  ["SET_IRQS: two ACTION bits", decodeDeviceSetIrqsRequest, "14000000 31000000 02000000 00000000 01000000", Errno.EINVAL],
  ["SET_IRQS: no ACTION bit", decodeDeviceSetIrqsRequest, "14000000 04000000 02000000 00000000 01000000", Errno.EINVAL],
  ["SET_IRQS: undefined flag bit", decodeDeviceSetIrqsRequest, "14000000 64000000 02000000 00000000 01000000", Errno.EINVAL],
  ["SET_IRQS: BOOL data shorter than count", decodeDeviceSetIrqsRequest, "17000000 0a000000 00000000 00000000 03000000 0100", Errno.EINVAL],
  ["SET_IRQS: BOOL data longer than count", decodeDeviceSetIrqsRequest, "17000000 0a000000 00000000 00000000 01000000 0100", Errno.EINVAL],
  ["SET_IRQS: NONE with data", decodeDeviceSetIrqsRequest, "15000000 21000000 00000000 00000000 01000000 01", Errno.EINVAL],
  ["SET_IRQS: EVENTFD with in-band data", decodeDeviceSetIrqsRequest, "18000000 24000000 00000000 00000000 01000000 05000000", Errno.EINVAL],
  ["SET_IRQS reply: payload", decodeDeviceSetIrqsReply, "00", Errno.EINVAL],

  // REGION_READ / REGION_WRITE
  ["REGION_READ: short", decodeRegionReadRequest, `${Z8} 07000000`, Errno.EINVAL],
  ["REGION_READ: trailing data", decodeRegionReadRequest, `${Z8} 07000000 04000000 00`, Errno.EINVAL],
  ["REGION_READ reply: data shorter than count", decodeRegionReadReply, `${Z8} 07000000 04000000 000000`, Errno.EINVAL],
  ["REGION_READ reply: data longer than count", decodeRegionReadReply, `${Z8} 07000000 02000000 000000`, Errno.EINVAL],
  ["REGION_WRITE: short", decodeRegionWriteRequest, `${Z8} 07000000 0000`, Errno.EINVAL],
  ["REGION_WRITE: data shorter than count", decodeRegionWriteRequest, `${Z8} 07000000 04000000 0000`, Errno.EINVAL],
  ["REGION_WRITE: data longer than count", decodeRegionWriteRequest, `${Z8} 07000000 01000000 0000`, Errno.EINVAL],
  ["REGION_WRITE: count 2^32-1 with no data", decodeRegionWriteRequest, `${Z8} 07000000 ffffffff`, Errno.EINVAL],

  // DMA_READ / DMA_WRITE
  ["DMA_READ: short", decodeDmaReadRequest, Z8, Errno.EINVAL],
  ["DMA_READ reply: data shorter than count", decodeDmaReadReply, `${Z8} 0800000000000000 00000000`, Errno.EINVAL],
  ["DMA_READ reply: count beyond 2^32", decodeDmaReadReply, `${Z8} 0000000001000000`, Errno.EINVAL],
  ["DMA_WRITE: short", decodeDmaWriteRequest, `${Z8} 0100`, Errno.EINVAL],
  ["DMA_WRITE: data longer than count", decodeDmaWriteRequest, `${Z8} 0100000000000000 0000`, Errno.EINVAL],
  ["DMA_WRITE reply: 8 bytes", decodeDmaWriteReply, Z8, Errno.EINVAL],
  ["DMA_WRITE reply: 13 bytes", decodeDmaWriteReply, `${Z8} 03000000 00`, Errno.EINVAL],
  ["DMA_WRITE reply: u64 count beyond 32 bits", decodeDmaWriteReply, `${Z8} 0300000001000000`, Errno.EINVAL],

  // DEVICE_RESET
  ["DEVICE_RESET: payload", decodeDeviceResetRequest, "00", Errno.EINVAL],

  // REGION_WRITE_MULTI
  ["WRITE_MULTI: short", decodeRegionWriteMultiRequest, "01000000", Errno.EINVAL],
  ["WRITE_MULTI: wr_cnt beyond the entries", decodeRegionWriteMultiRequest, `0200000000000000 ${Z8} 00000000 01000000 ${Z8}`, Errno.EINVAL],
  ["WRITE_MULTI: wr_cnt below the entries", decodeRegionWriteMultiRequest, `0000000000000000 ${Z8} 00000000 01000000 ${Z8}`, Errno.EINVAL],
  ["WRITE_MULTI: entry count above 8", decodeRegionWriteMultiRequest, `0100000000000000 ${Z8} 00000000 09000000 ${Z8}`, Errno.EINVAL],
  ["WRITE_MULTI: wr_cnt above 200", decodeRegionWriteMultiRequest, "c900000000000000", Errno.EINVAL],
  ["WRITE_MULTI: wr_cnt 2^64-1", decodeRegionWriteMultiRequest, "ffffffffffffffff", Errno.EINVAL],

  // DEVICE_FEATURE and its data
  ["FEATURE: short", decodeDeviceFeatureRequest, "08000000 0100", Errno.EINVAL],
  ["FEATURE: argsz below 8", decodeDeviceFeatureRequest, "07000000 01000100", Errno.EINVAL],
  ["FEATURE: undefined flag bit 19", decodeDeviceFeatureRequest, "08000000 01000800", Errno.EINVAL],
  ["FEATURE: GET and SET without PROBE", decodeDeviceFeatureRequest, "08000000 02000300", Errno.EINVAL],
  ["MIGRATION data: short", decodeFeatureMigration, "05000000", Errno.EINVAL],
  ["MIG_DEVICE_STATE data: short", decodeFeatureMigState, "03000000", Errno.EINVAL],
  ["MIG_DEVICE_STATE data: unknown state 8", decodeFeatureMigState, "08000000 ffffffff", Errno.EINVAL],
  ["DMA_LOGGING control: short", decodeDmaLoggingControl, `${Z8} 00000000`, Errno.EINVAL],
  ["DMA_LOGGING control: reserved set", decodeDmaLoggingControl, `0010000000000000 00000000 01000000`, Errno.EINVAL],
  ["DMA_LOGGING control: num_ranges beyond the data", decodeDmaLoggingControl, `0010000000000000 02000000 00000000 ${Z8} ${Z8}`, Errno.EINVAL],
  ["DMA_LOGGING control: trailing bytes", decodeDmaLoggingControl, `0010000000000000 00000000 00000000 00`, Errno.EINVAL],
  ["DMA_LOGGING_REPORT: short", decodeDmaLoggingReportRequest, `${Z8} ${Z8}`, Errno.EINVAL],
  ["DMA_LOGGING_REPORT: page_size 0", decodeDmaLoggingReportRequest, `${Z8} ${Z8} ${Z8}`, Errno.EINVAL],
  ["DMA_LOGGING_REPORT: page_size 3000", decodeDmaLoggingReportRequest, `${Z8} ${Z8} b80b000000000000`, Errno.EINVAL],
  ["DMA_LOGGING_REPORT reply: bitmap not whole u64s", decodeDmaLoggingReportReply, `${Z8} ${Z8} 0010000000000000 0000`, Errno.EINVAL],
  ["MIG_DATA_SIZE data: long", decodeFeatureMigDataSize, `${Z8} 00`, Errno.EINVAL],

  // MIG_DATA_READ / MIG_DATA_WRITE
  ["MIG_DATA_READ: short", decodeMigDataReadRequest, "08000000", Errno.EINVAL],
  ["MIG_DATA_READ: argsz below 8", decodeMigDataReadRequest, "07000000 00100000", Errno.EINVAL],
  ["MIG_DATA_READ reply: data shorter than size", decodeMigDataReadReply, "0c000000 04000000 0000", Errno.EINVAL],
  ["MIG_DATA_WRITE: short", decodeMigDataWriteRequest, "08000000 00", Errno.EINVAL],
  ["MIG_DATA_WRITE: data longer than size", decodeMigDataWriteRequest, "08000000 01000000 0000", Errno.EINVAL],
  ["MIG_DATA_WRITE reply: payload", decodeMigDataWriteReply, "00", Errno.EINVAL],

  // MIG_GET_PRECOPY_INFO (extension)
  ["PRECOPY_INFO: short", decodeMigGetPrecopyInfoRequest, "18000000", Errno.EINVAL],
  ["PRECOPY_INFO: argsz below 24", decodeMigGetPrecopyInfoRequest, "17000000 00000000", Errno.EINVAL],
  ["PRECOPY_INFO: flags set", decodeMigGetPrecopyInfoRequest, "18000000 01000000", Errno.EINVAL],
  ["PRECOPY_INFO: 24-byte shape with flags set", decodeMigGetPrecopyInfoRequest, "00000000 01000000 0000000000000000 0000000000000000", Errno.EINVAL],
  ["PRECOPY_INFO: 24-byte shape with argsz 8", decodeMigGetPrecopyInfoRequest, "08000000 00000000 0000000000000000 0000000000000000", Errno.EINVAL],
  ["PRECOPY_INFO: 16 bytes", decodeMigGetPrecopyInfoRequest, "18000000 00000000 0000000000000000", Errno.EINVAL],
];

describe("malformed bodies", () => {
  it.each(cases)("%s", (_what, decode, body, errno) => {
    let caught: unknown;
    try {
      decode(hex(body));
    } catch (err) {
      caught = err;
    }
    expect(caught).toBeInstanceOf(VfioUserError);
    expect((caught as VfioUserError).errno).toBe(errno);
  });

  it("an empty body is refused by every decoder that needs a fixed part", () => {
    const needFixed: Decoder[] = [
      decodeVersion,
      decodeDmaMapRequest,
      decodeDmaUnmapRequest,
      decodeDeviceGetInfoRequest,
      decodeDeviceGetRegionInfoRequest,
      decodeDeviceGetRegionInfoReply,
      decodeDeviceGetRegionIoFdsRequest,
      decodeDeviceGetIrqInfoRequest,
      decodeDeviceSetIrqsRequest,
      decodeRegionReadRequest,
      decodeRegionReadReply,
      decodeRegionWriteRequest,
      decodeDmaReadRequest,
      decodeDmaReadReply,
      decodeDmaWriteRequest,
      decodeRegionWriteMultiRequest,
      decodeDeviceFeatureRequest,
      decodeMigDataReadRequest,
      decodeMigDataReadReply,
      decodeMigDataWriteRequest,
      decodeMigGetPrecopyInfoRequest,
    ];
    for (const decode of needFixed) {
      expect(() => decode(new Uint8Array(0)), decode.name).toThrow(VfioUserError);
    }
  });
});

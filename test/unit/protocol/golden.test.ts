/**
 * Golden byte vectors for every message, request and reply, written by hand
 * from the layout tables of docs/interop/vfio-user.rst (offsets relative to
 * the end of the 16-byte header, little-endian). Each is checked both ways:
 * encode(object) == bytes and decode(bytes) == object.
 */
import { describe, expect, it } from "vitest";
import {
  decodeDeviceFeatureReply,
  decodeDeviceFeatureRequest,
  decodeDeviceGetInfoReply,
  decodeDeviceGetInfoRequest,
  decodeDeviceGetIrqInfoReply,
  decodeDeviceGetIrqInfoRequest,
  decodeDeviceGetRegionInfoReply,
  decodeDeviceGetRegionInfoRequest,
  decodeDeviceGetRegionIoFdsReply,
  decodeDeviceGetRegionIoFdsRequest,
  decodeDeviceResetReply,
  decodeDeviceResetRequest,
  decodeDeviceSetIrqsReply,
  decodeDeviceSetIrqsRequest,
  decodeDmaLoggingControl,
  decodeDmaLoggingReportReply,
  decodeDmaLoggingReportRequest,
  decodeDmaMapReply,
  decodeDmaMapRequest,
  decodeDmaReadReply,
  decodeDmaReadRequest,
  decodeDmaUnmapReply,
  decodeDmaUnmapRequest,
  decodeDmaWriteReply,
  decodeDmaWriteRequest,
  decodeFeatureMigDataSize,
  decodeFeatureMigState,
  decodeFeatureMigration,
  decodeHeader,
  decodeMigDataReadReply,
  decodeMigDataReadRequest,
  decodeMigDataWriteReply,
  decodeMigDataWriteRequest,
  decodeMigGetPrecopyInfoReply,
  decodeMigGetPrecopyInfoRequest,
  decodeRegionReadReply,
  decodeRegionReadRequest,
  decodeRegionWriteMultiReply,
  decodeRegionWriteMultiRequest,
  decodeRegionWriteReply,
  decodeRegionWriteRequest,
  decodeVersion,
  encodeDeviceFeature,
  encodeDeviceFeatureParts,
  encodeDeviceGetInfoReply,
  encodeDeviceGetInfoRequest,
  encodeDeviceGetIrqInfoReply,
  encodeDeviceGetIrqInfoRequest,
  encodeDeviceGetRegionInfoReply,
  encodeDeviceGetRegionInfoRequest,
  encodeDeviceGetRegionIoFdsReply,
  encodeDeviceGetRegionIoFdsRequest,
  encodeDeviceResetReply,
  encodeDeviceResetRequest,
  encodeDeviceSetIrqsReply,
  encodeDeviceSetIrqsRequest,
  encodeDmaLoggingControl,
  encodeDmaLoggingReportReply,
  encodeDmaLoggingReportReplyParts,
  encodeDmaLoggingReportRequest,
  encodeDmaMapReply,
  encodeDmaMapRequest,
  encodeDmaReadReply,
  encodeDmaReadReplyParts,
  encodeDmaReadRequest,
  encodeDmaUnmapReply,
  encodeDmaUnmapRequest,
  encodeDmaWriteReply,
  encodeDmaWriteRequest,
  encodeDmaWriteRequestParts,
  encodeFeatureMigDataSize,
  encodeFeatureMigState,
  encodeFeatureMigration,
  encodeHeader,
  encodeMigDataReadReply,
  encodeMigDataReadReplyParts,
  encodeMigDataReadRequest,
  encodeMigDataWriteReply,
  encodeMigDataWriteRequest,
  encodeMigDataWriteRequestParts,
  encodeMigGetPrecopyInfoReply,
  encodeMigGetPrecopyInfoRequest,
  encodeRegionReadReply,
  encodeRegionReadReplyParts,
  encodeRegionReadRequest,
  encodeRegionWriteMultiReply,
  encodeRegionWriteMultiRequest,
  encodeRegionWriteReply,
  encodeRegionWriteRequest,
  encodeRegionWriteRequestParts,
  encodeVersion,
  regionInfoReply,
  sparseMmapCap,
  typeCap,
  type DeviceGetRegionInfoReply,
  type RegionInfoCap,
} from "../../../protocol/index.ts";
import { hex, toHex } from "./helpers.ts";

/** Registers a two-way golden check. */
function golden<T>(name: string, encode: (m: T) => Uint8Array, decode: (b: Uint8Array) => T, obj: T, bytes: string): void {
  it(name, () => {
    expect(toHex(encode(obj))).toBe(toHex(hex(bytes)));
    expect(decode(hex(bytes))).toEqual(obj);
  });
}

describe("golden: header", () => {
  golden(
    "reply header",
    encodeHeader,
    (b) => decodeHeader(b),
    { msgId: 0x1234, command: 5, size: 48, flags: 1, error: 0 },
    //  msg_id | command | size     | flags    | error
    "   3412   | 0500    | 30000000 | 01000000 | 00000000",
  );
  golden(
    "error reply header with No_reply and Error bits",
    encodeHeader,
    (b) => decodeHeader(b),
    { msgId: 0xffff, command: 16, size: 16, flags: 0x31, error: 22 },
    "ffff | 1000 | 10000000 | 31000000 | 16000000",
  );
});

describe("golden: VERSION", () => {
  const json = '{"capabilities":{"max_msg_fds":8}}';
  const jsonHex = Buffer.from(json, "utf8").toString("hex");
  golden("request with capabilities", encodeVersion, decodeVersion, { major: 0, minor: 0, data: json }, `0000 | 0000 | ${jsonHex} 00`);
  golden("reply with major 1 minor 3, no data", encodeVersion, decodeVersion, { major: 1, minor: 3, data: "" }, "0100 | 0300");
});

describe("golden: DMA_MAP / DMA_UNMAP", () => {
  golden(
    "DMA_MAP request",
    encodeDmaMapRequest,
    decodeDmaMapRequest,
    { argsz: 32, flags: 3, offset: 0x1000n, address: 0xfeed_0000_0000n, size: 0x20_0000n },
    // argsz  | flags    | offset           | address          | size
    "20000000 | 03000000 | 0010000000000000 | 00000000edfe0000 | 0000200000000000",
  );
  golden("DMA_MAP reply", encodeDmaMapReply, decodeDmaMapReply, {}, "");
  const unmap = { argsz: 24, flags: 0, address: 0x10_0000n, size: 0x4000n };
  const unmapHex = "18000000 | 00000000 | 0000100000000000 | 0040000000000000";
  golden("DMA_UNMAP request", encodeDmaUnmapRequest, decodeDmaUnmapRequest, unmap, unmapHex);
  golden("DMA_UNMAP reply echoes the entry", encodeDmaUnmapReply, decodeDmaUnmapReply, unmap, unmapHex);
  golden(
    "DMA_UNMAP request with FLAG_ALL",
    encodeDmaUnmapRequest,
    decodeDmaUnmapRequest,
    { argsz: 24, flags: 2, address: 0n, size: 0n },
    "18000000 | 02000000 | 0000000000000000 | 0000000000000000",
  );
});

describe("golden: DEVICE_GET_INFO / DEVICE_GET_IRQ_INFO", () => {
  golden("GET_INFO request", encodeDeviceGetInfoRequest, decodeDeviceGetInfoRequest, { argsz: 16 }, "10000000 00000000 00000000 00000000");
  golden(
    "GET_INFO reply",
    encodeDeviceGetInfoReply,
    decodeDeviceGetInfoReply,
    { argsz: 16, flags: 3, num_regions: 9, num_irqs: 5 },
    // argsz  | flags    | num_regions | num_irqs
    "10000000 | 03000000 | 09000000    | 05000000",
  );
  golden(
    "GET_IRQ_INFO request",
    encodeDeviceGetIrqInfoRequest,
    decodeDeviceGetIrqInfoRequest,
    { argsz: 16, index: 2 },
    "10000000 | 00000000 | 02000000 | 00000000",
  );
  golden(
    "GET_IRQ_INFO reply",
    encodeDeviceGetIrqInfoReply,
    decodeDeviceGetIrqInfoReply,
    { argsz: 16, flags: 9, index: 2, count: 32 },
    "10000000 | 09000000 | 02000000 | 20000000",
  );
});

describe("golden: DEVICE_GET_REGION_INFO", () => {
  golden(
    "request",
    encodeDeviceGetRegionInfoRequest,
    decodeDeviceGetRegionInfoRequest,
    { argsz: 256, index: 7 },
    // argsz  | flags    | index    | cap_offset | size             | offset
    "00010000 | 00000000 | 07000000 | 00000000   | 0000000000000000 | 0000000000000000",
  );
  golden<DeviceGetRegionInfoReply>(
    "reply without capabilities",
    encodeDeviceGetRegionInfoReply,
    decodeDeviceGetRegionInfoReply,
    { argsz: 32, flags: 3, index: 7, cap_offset: 0, size: 256n, offset: 0x700_0000_0000n, caps: [] },
    "20000000 | 03000000 | 07000000 | 00000000 | 0001000000000000 | 0000000000070000",
  );

  const caps: RegionInfoCap[] = [
    sparseMmapCap([
      { offset: 0x1000n, size: 0x1000n },
      { offset: 0x3000n, size: 0x1000n },
    ]),
    typeCap(1, 2),
  ];
  const withCaps =
    // fixed: argsz 96, flags R|W|MMAP|CAPS, index 0, cap_offset 32, size 0x4000, offset 0
    "60000000 | 0f000000 | 00000000 | 20000000 | 0040000000000000 | 0000000000000000" +
    // sparse mmap cap at 32: id 1, version 1, next 80 | nr_areas 2, reserved | two areas
    "0100 0100 50000000 | 02000000 00000000 | 0010000000000000 0010000000000000 | 0030000000000000 0010000000000000" +
    // type cap at 80: id 2, version 1, next 0 | type 1, subtype 2
    "0200 0100 00000000 | 01000000 02000000";
  golden<DeviceGetRegionInfoReply>(
    "reply with a sparse mmap and a type capability",
    encodeDeviceGetRegionInfoReply,
    decodeDeviceGetRegionInfoReply,
    { argsz: 96, flags: 0xf, index: 0, cap_offset: 32, size: 0x4000n, offset: 0n, caps },
    withCaps,
  );

  it("regionInfoReply includes the capabilities when the client's argsz fits them", () => {
    const reply = regionInfoReply({ flags: 7, index: 0, size: 0x4000n, offset: 0n, caps }, 96);
    expect(toHex(encodeDeviceGetRegionInfoReply(reply))).toBe(toHex(hex(withCaps)));
  });

  it("regionInfoReply sends only the fixed part with the needed argsz when the client's argsz is short", () => {
    // spec "Message sizes": argsz says how much is needed; CAPS stays clear (QEMU rejects CAPS with cap_offset 0)
    const reply = regionInfoReply({ flags: 7, index: 0, size: 0x4000n, offset: 0n, caps }, 32);
    const bytes = "60000000 | 07000000 | 00000000 | 00000000 | 0040000000000000 | 0000000000000000";
    expect(toHex(encodeDeviceGetRegionInfoReply(reply))).toBe(toHex(hex(bytes)));
    expect(decodeDeviceGetRegionInfoReply(hex(bytes))).toEqual(reply);
  });
});

describe("golden: DEVICE_GET_REGION_IO_FDS", () => {
  golden(
    "request",
    encodeDeviceGetRegionIoFdsRequest,
    decodeDeviceGetRegionIoFdsRequest,
    { argsz: 96, index: 0 },
    "60000000 | 00000000 | 00000000 | 00000000",
  );
  golden(
    "reply with an ioeventfd and an ioregionfd",
    encodeDeviceGetRegionIoFdsReply,
    decodeDeviceGetRegionIoFdsReply,
    {
      argsz: 96,
      flags: 0,
      index: 0,
      count: 2,
      sub_regions: [
        { offset: 0x2000n, size: 4n, fd_index: 0, type: 0, flags: 1, datamatch: 0xdeadbeefn },
        { offset: 0x3000n, size: 8n, fd_index: 1, type: 1, flags: 2, user_data: 0x1122334455667788n },
      ],
    },
    "60000000 | 00000000 | 00000000 | 02000000" +
      // offset         | size             | fd_index | type     | flags    | padding  | datamatch
      "0020000000000000 | 0400000000000000 | 00000000 | 00000000 | 01000000 | 00000000 | efbeadde00000000" +
      // offset         | size             | fd_index | type     | flags    | padding  | user_data
      "0030000000000000 | 0800000000000000 | 01000000 | 01000000 | 02000000 | 00000000 | 8877665544332211",
  );
  golden(
    "short reply: count without the array",
    encodeDeviceGetRegionIoFdsReply,
    decodeDeviceGetRegionIoFdsReply,
    { argsz: 96, flags: 0, index: 0, count: 2, sub_regions: [] },
    "60000000 | 00000000 | 00000000 | 02000000",
  );
});

describe("golden: DEVICE_SET_IRQS", () => {
  golden(
    "eventfd trigger (fds travel out of band)",
    encodeDeviceSetIrqsRequest,
    decodeDeviceSetIrqsRequest,
    { argsz: 20, flags: 0x24, index: 2, start: 0, count: 2 },
    // argsz  | flags    | index    | start    | count
    "14000000 | 24000000 | 02000000 | 00000000 | 02000000",
  );
  golden(
    "DATA_BOOL mask with count bytes of data",
    encodeDeviceSetIrqsRequest,
    decodeDeviceSetIrqsRequest,
    { argsz: 23, flags: 0x0a, index: 0, start: 1, count: 3, data: hex("010001") },
    "17000000 | 0a000000 | 00000000 | 01000000 | 03000000 | 010001",
  );
  golden(
    "DATA_NONE with count 0 disables the index",
    encodeDeviceSetIrqsRequest,
    decodeDeviceSetIrqsRequest,
    { argsz: 20, flags: 0x21, index: 1, start: 0, count: 0 },
    "14000000 | 21000000 | 01000000 | 00000000 | 00000000",
  );
  golden("reply", encodeDeviceSetIrqsReply, decodeDeviceSetIrqsReply, {}, "");
});

describe("golden: REGION_READ / REGION_WRITE", () => {
  golden(
    "REGION_READ request",
    encodeRegionReadRequest,
    decodeRegionReadRequest,
    { offset: 0x10n, region: 7, count: 4 },
    // offset         | region   | count
    "1000000000000000 | 07000000 | 04000000",
  );
  golden(
    "REGION_READ reply",
    encodeRegionReadReply,
    decodeRegionReadReply,
    { offset: 0x10n, region: 7, count: 4, data: hex("86801000") },
    "1000000000000000 | 07000000 | 04000000 | 86801000",
  );
  golden(
    "REGION_WRITE request",
    encodeRegionWriteRequest,
    decodeRegionWriteRequest,
    { offset: 4n, region: 7, count: 2, data: hex("0600") },
    "0400000000000000 | 07000000 | 02000000 | 0600",
  );
  golden(
    "REGION_WRITE reply",
    encodeRegionWriteReply,
    decodeRegionWriteReply,
    { offset: 4n, region: 7, count: 2 },
    "0400000000000000 | 07000000 | 02000000",
  );
});

describe("golden: DMA_READ / DMA_WRITE", () => {
  golden(
    "DMA_READ request",
    encodeDmaReadRequest,
    decodeDmaReadRequest,
    { address: 0x1234_5678_9000n, count: 8n },
    // address        | count
    "0090785634120000 | 0800000000000000",
  );
  golden(
    "DMA_READ reply",
    encodeDmaReadReply,
    decodeDmaReadReply,
    { address: 0x1234_5678_9000n, count: 8n, data: hex("0102030405060708") },
    "0090785634120000 | 0800000000000000 | 0102030405060708",
  );
  golden(
    "DMA_WRITE request",
    encodeDmaWriteRequest,
    decodeDmaWriteRequest,
    { address: 0x2000n, count: 3n, data: hex("aabbcc") },
    "0020000000000000 | 0300000000000000 | aabbcc",
  );
  golden(
    "DMA_WRITE reply (spec table: count is 4 bytes)",
    encodeDmaWriteReply,
    decodeDmaWriteReply,
    { address: 0x2000n, count: 3 },
    "0020000000000000 | 03000000",
  );
  it("DMA_WRITE reply forms of QEMU (empty) and libvfio-user (u64 count) decode too", () => {
    expect(decodeDmaWriteReply(hex(""))).toEqual({});
    expect(decodeDmaWriteReply(hex("0020000000000000 | 0300000000000000"))).toEqual({ address: 0x2000n, count: 3 });
  });
});

describe("golden: DEVICE_RESET / REGION_WRITE_MULTI", () => {
  golden("DEVICE_RESET request", encodeDeviceResetRequest, decodeDeviceResetRequest, {}, "");
  golden("DEVICE_RESET reply", encodeDeviceResetReply, decodeDeviceResetReply, {}, "");
  golden(
    "REGION_WRITE_MULTI request",
    encodeRegionWriteMultiRequest,
    decodeRegionWriteMultiRequest,
    {
      wrs: [
        { offset: 0x1000n, region: 0, data: hex("01000000") },
        { offset: 8n, region: 2, data: hex("1122334455667788") },
      ],
    },
    "0200000000000000" + // wr_cnt
      // offset         | region   | count    | data (8 bytes, first count used)
      "0010000000000000 | 00000000 | 04000000 | 0100000000000000" +
      "0800000000000000 | 02000000 | 08000000 | 1122334455667788",
  );
  golden("REGION_WRITE_MULTI reply", encodeRegionWriteMultiReply, decodeRegionWriteMultiReply, { wr_cnt: 2n }, "0200000000000000");
});

describe("golden: DEVICE_FEATURE", () => {
  golden(
    "GET MIGRATION request (no data)",
    encodeDeviceFeature,
    decodeDeviceFeatureRequest,
    { argsz: 16, flags: 0x1_0001, data: hex("") },
    // argsz  | flags: index 1 | GET (bit 16)
    "10000000 | 01000100",
  );
  golden(
    "GET MIGRATION reply",
    encodeDeviceFeature,
    decodeDeviceFeatureReply,
    { argsz: 16, flags: 0x1_0001, data: hex("0500000000000000") },
    "10000000 | 01000100 | 0500000000000000",
  );
  golden(
    "SET MIG_DEVICE_STATE request",
    encodeDeviceFeature,
    decodeDeviceFeatureRequest,
    { argsz: 16, flags: 0x2_0002, data: hex("03000000ffffffff") },
    "10000000 | 02000200 | 03000000 | ffffffff",
  );
  golden(
    "PROBE with GET and SET",
    encodeDeviceFeature,
    decodeDeviceFeatureRequest,
    { argsz: 8, flags: 0x7_0006, data: hex("") },
    "08000000 | 06000700",
  );
  it("parts form keeps the data buffer", () => {
    const data = hex("0500000000000000");
    const parts = encodeDeviceFeatureParts({ argsz: 16, flags: 0x1_0001, data });
    expect(parts[1]).toBe(data);
    expect(toHex(Buffer.concat(parts))).toBe(toHex(hex("10000000 01000100 0500000000000000")));
  });

  golden("MIGRATION data", encodeFeatureMigration, decodeFeatureMigration, { flags: 5n }, "0500000000000000");
  golden(
    "MIG_DEVICE_STATE data",
    encodeFeatureMigState,
    decodeFeatureMigState,
    { device_state: 3, data_fd: -1 },
    // device_state | data_fd (s32)
    "03000000       | ffffffff",
  );
  golden(
    "DMA_LOGGING_START data with one range",
    encodeDmaLoggingControl,
    decodeDmaLoggingControl,
    { page_size: 4096n, ranges: [{ iova: 0x10_0000n, length: 0x20_0000n }] },
    // page_size      | num_ranges | reserved | iova             | length
    "0010000000000000 | 01000000   | 00000000 | 0000100000000000 | 0000200000000000",
  );
  golden(
    "DMA_LOGGING_STOP data with no range",
    encodeDmaLoggingControl,
    decodeDmaLoggingControl,
    { page_size: 4096n, ranges: [] },
    "0010000000000000 | 00000000 | 00000000",
  );
  golden(
    "DMA_LOGGING_REPORT request data",
    encodeDmaLoggingReportRequest,
    decodeDmaLoggingReportRequest,
    { iova: 0x1_0000n, length: 0x1_0000n, page_size: 0x1000n },
    // iova           | length           | page_size
    "0000010000000000 | 0000010000000000 | 0010000000000000",
  );
  golden(
    "DMA_LOGGING_REPORT reply data with the bitmap at offset 24",
    encodeDmaLoggingReportReply,
    decodeDmaLoggingReportReply,
    { iova: 0x1_0000n, length: 0x1_0000n, page_size: 0x1000n, bitmap: hex("0581000000000000") },
    "0000010000000000 | 0000010000000000 | 0010000000000000 | 0581000000000000",
  );
  golden(
    "MIG_DATA_SIZE data",
    encodeFeatureMigDataSize,
    decodeFeatureMigDataSize,
    { stop_copy_length: 0x1_2345_6789n },
    "8967452301000000",
  );
});

describe("golden: MIG_DATA_READ / MIG_DATA_WRITE / MIG_GET_PRECOPY_INFO", () => {
  golden(
    "MIG_DATA_READ request",
    encodeMigDataReadRequest,
    decodeMigDataReadRequest,
    { argsz: 0x1008, size: 0x1000 },
    // argsz  | size
    "08100000 | 00100000",
  );
  golden(
    "MIG_DATA_READ reply",
    encodeMigDataReadReply,
    decodeMigDataReadReply,
    { argsz: 12, size: 4, data: hex("deadbeef") },
    "0c000000 | 04000000 | deadbeef",
  );
  golden(
    "MIG_DATA_WRITE request",
    encodeMigDataWriteRequest,
    decodeMigDataWriteRequest,
    { argsz: 8, size: 3, data: hex("010203") },
    "08000000 | 03000000 | 010203",
  );
  golden("MIG_DATA_WRITE reply", encodeMigDataWriteReply, decodeMigDataWriteReply, {}, "");
  golden(
    "MIG_GET_PRECOPY_INFO request (extension)",
    encodeMigGetPrecopyInfoRequest,
    decodeMigGetPrecopyInfoRequest,
    { argsz: 24, flags: 0 },
    "18000000 | 00000000",
  );
  it("MIG_GET_PRECOPY_INFO request, the 24-byte shape QEMU's prototype sends (all zero, argsz 0 read as 24)", () => {
    // argsz  | flags    | initial_bytes    | dirty_bytes (ignored in a request)
    expect(decodeMigGetPrecopyInfoRequest(hex("00000000 | 00000000 | 0000000000000000 | 0000000000000000"))).toEqual({ argsz: 24, flags: 0 });
    expect(decodeMigGetPrecopyInfoRequest(hex("18000000 | 00000000 | 0100000000000000 | 0200000000000000"))).toEqual({ argsz: 24, flags: 0 });
    expect(decodeMigGetPrecopyInfoRequest(hex("00010000 | 00000000 | 0000000000000000 | 0000000000000000"))).toEqual({ argsz: 256, flags: 0 });
  });
  golden(
    "MIG_GET_PRECOPY_INFO reply (extension)",
    encodeMigGetPrecopyInfoReply,
    decodeMigGetPrecopyInfoReply,
    { argsz: 24, flags: 0, initial_bytes: 0x1000n, dirty_bytes: 0x20n },
    // argsz  | flags    | initial_bytes    | dirty_bytes
    "18000000 | 00000000 | 0010000000000000 | 2000000000000000",
  );
});

describe("parts encoders reference the data instead of copying it", () => {
  it.each([
    ["REGION_READ reply", (d: Buffer) => encodeRegionReadReplyParts({ offset: 0n, region: 0, count: d.length, data: d })],
    ["REGION_WRITE", (d: Buffer) => encodeRegionWriteRequestParts({ offset: 0n, region: 0, count: d.length, data: d })],
    ["DMA_READ reply", (d: Buffer) => encodeDmaReadReplyParts({ address: 0n, count: BigInt(d.length), data: d })],
    ["DMA_WRITE", (d: Buffer) => encodeDmaWriteRequestParts({ address: 0n, count: BigInt(d.length), data: d })],
    ["MIG_DATA_READ reply", (d: Buffer) => encodeMigDataReadReplyParts({ argsz: 8 + d.length, size: d.length, data: d })],
    ["MIG_DATA_WRITE", (d: Buffer) => encodeMigDataWriteRequestParts({ argsz: 8, size: d.length, data: d })],
    [
      "DMA_LOGGING_REPORT reply",
      (d: Buffer) => encodeDmaLoggingReportReplyParts({ iova: 0n, length: 0n, page_size: 4096n, bitmap: d }),
    ],
  ])("%s", (_name, encode) => {
    const data = Buffer.alloc(64, 0xa5);
    const parts = encode(data);
    expect(parts).toHaveLength(2);
    expect(parts[1]).toBe(data);
  });
});

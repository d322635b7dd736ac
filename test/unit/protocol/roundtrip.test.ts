/**
 * decode(encode(x)) == x with edge values in every field (0, 1, 2^32-1,
 * 2^53+1, 2^64-1), and encoders refuse values their field cannot carry.
 */
import { describe, expect, it } from "vitest";
import * as P from "../../../protocol/index.ts";
import { U64_MAX } from "../../../protocol/index.ts";

const U32 = [0, 1, 0xffff_ffff];
const U64 = [0n, 1n, (1n << 53n) + 1n, U64_MAX];

function rt<T>(encode: (m: T) => Uint8Array, decode: (b: Uint8Array) => T, msgs: T[]): void {
  for (const m of msgs) expect(decode(encode(m))).toEqual(m);
}

/** Every combination of one value per field (cartesian product, small lists only). */
function combos<T extends Record<string, unknown>>(fields: { [K in keyof T]: readonly T[K][] }): T[] {
  let out: Record<string, unknown>[] = [{}];
  for (const [key, values] of Object.entries(fields) as [string, readonly unknown[]][]) {
    out = out.flatMap((o) => values.map((v) => ({ ...o, [key]: v })));
  }
  return out as T[];
}

describe("round trips with edge values", () => {
  it("header", () => {
    rt(P.encodeHeader, (b) => P.decodeHeader(b), combos({ msgId: [0, 0xffff], command: [0, 0xffff], size: U32, flags: U32, error: U32 }));
  });

  it("VERSION", () => {
    rt(P.encodeVersion, P.decodeVersion, combos({ major: [0, 0xffff], minor: [0, 0xffff], data: ["", "{}", '{"x":"é✓"}'] }));
  });

  it("DMA_MAP request", () => {
    rt(P.encodeDmaMapRequest, P.decodeDmaMapRequest, combos({ argsz: [32, 0xffff_ffff], flags: [0, 1, 2, 3], offset: U64, address: U64, size: U64 }));
  });

  it("DMA_UNMAP request and reply", () => {
    const msgs = combos({ argsz: [24, 0xffff_ffff], flags: [0], address: U64, size: U64 });
    rt(P.encodeDmaUnmapRequest, P.decodeDmaUnmapRequest, msgs);
    rt(P.encodeDmaUnmapReply, P.decodeDmaUnmapReply, combos({ argsz: U32, flags: U32, address: U64, size: U64 }));
  });

  it("DEVICE_GET_INFO", () => {
    rt(P.encodeDeviceGetInfoRequest, P.decodeDeviceGetInfoRequest, [{ argsz: 16 }, { argsz: 0xffff_ffff }]);
    rt(P.encodeDeviceGetInfoReply, P.decodeDeviceGetInfoReply, combos({ argsz: U32, flags: U32, num_regions: U32, num_irqs: U32 }));
  });

  it("DEVICE_GET_IRQ_INFO", () => {
    rt(P.encodeDeviceGetIrqInfoRequest, P.decodeDeviceGetIrqInfoRequest, combos({ argsz: [16, 0xffff_ffff], index: U32 }));
    rt(P.encodeDeviceGetIrqInfoReply, P.decodeDeviceGetIrqInfoReply, combos({ argsz: U32, flags: U32, index: U32, count: U32 }));
  });

  it("DEVICE_GET_REGION_INFO", () => {
    rt(P.encodeDeviceGetRegionInfoRequest, P.decodeDeviceGetRegionInfoRequest, combos({ argsz: [32, 0xffff_ffff], index: U32 }));
    const caps: P.RegionInfoCap[] = [
      P.sparseMmapCap(U64.map((v) => ({ offset: v, size: U64_MAX - v }))),
      { kind: "raw", id: P.RegionCapId.MSIX_MAPPABLE, version: 1, data: Buffer.alloc(0) },
      P.typeCap(0xffff_ffff, 0),
      { kind: "raw", id: 0xffff, version: 0xffff, data: Buffer.from([1, 2, 3]) },
      P.sparseMmapCap([]),
    ];
    for (const size of U64) {
      for (const offset of U64) {
        const full = P.regionInfoReply({ flags: 0xffff_fff7, index: 0xffff_ffff, size, offset, caps }, 0xffff_ffff);
        expect(full.caps).toHaveLength(caps.length);
        rt(P.encodeDeviceGetRegionInfoReply, P.decodeDeviceGetRegionInfoReply, [full]);
        const short = P.regionInfoReply({ flags: 0, index: 0, size, offset, caps }, 32);
        rt(P.encodeDeviceGetRegionInfoReply, P.decodeDeviceGetRegionInfoReply, [short]);
      }
    }
    // cap_offset past the fixed part with a gap before the first capability
    rt(P.encodeDeviceGetRegionInfoReply, P.decodeDeviceGetRegionInfoReply, [
      { argsz: 64, flags: P.RegionInfoFlags.CAPS, index: 1, cap_offset: 48, size: 0n, offset: 0n, caps: [P.typeCap(1, 1)] },
    ]);
  });

  it("DEVICE_GET_REGION_IO_FDS", () => {
    rt(P.encodeDeviceGetRegionIoFdsRequest, P.decodeDeviceGetRegionIoFdsRequest, combos({ argsz: [16, 0xffff_ffff], index: U32 }));
    const subs: P.SubRegionIoFd[] = U64.flatMap((v, i) => [
      { offset: v, size: U64_MAX - v, fd_index: U32[i % 3], type: 0 as const, flags: U32[(i + 1) % 3], datamatch: v },
      { offset: U64_MAX - v, size: v, fd_index: U32[(i + 2) % 3], type: 1 as const, flags: U32[i % 3], user_data: U64_MAX - v },
    ]);
    rt(P.encodeDeviceGetRegionIoFdsReply, P.decodeDeviceGetRegionIoFdsReply, [
      { argsz: P.regionIoFdsArgsz(subs.length), flags: 0, index: 0xffff_ffff, count: subs.length, sub_regions: subs },
      { argsz: 0xffff_ffff, flags: 0xffff_ffff, index: 0, count: 0xffff_ffff, sub_regions: [] },
    ]);
  });

  it("DEVICE_SET_IRQS", () => {
    const msgs: P.DeviceSetIrqsRequest[] = [];
    for (const data of [P.IrqSetFlags.DATA_NONE, P.IrqSetFlags.DATA_EVENTFD]) {
      for (const action of [P.IrqSetFlags.ACTION_MASK, P.IrqSetFlags.ACTION_UNMASK, P.IrqSetFlags.ACTION_TRIGGER]) {
        msgs.push(...combos({ argsz: [20, 0xffff_ffff], flags: [data | action], index: U32, start: U32, count: U32 }));
      }
    }
    const bools = Buffer.from([1, 0, 1, 1, 0]);
    msgs.push({ argsz: 25, flags: P.IrqSetFlags.DATA_BOOL | P.IrqSetFlags.ACTION_TRIGGER, index: 0xffff_ffff, start: 0xffff_ffff, count: 5, data: bools });
    msgs.push({ argsz: 20, flags: P.IrqSetFlags.DATA_BOOL | P.IrqSetFlags.ACTION_MASK, index: 0, start: 0, count: 0, data: Buffer.alloc(0) });
    rt(P.encodeDeviceSetIrqsRequest, P.decodeDeviceSetIrqsRequest, msgs);
  });

  it("REGION_READ / REGION_WRITE", () => {
    const data = Buffer.from("0123456789abcdef");
    rt(P.encodeRegionReadRequest, P.decodeRegionReadRequest, combos({ offset: U64, region: U32, count: U32 }));
    rt(P.encodeRegionReadReply, P.decodeRegionReadReply, combos({ offset: U64, region: U32, count: [16], data: [data] }));
    rt(P.encodeRegionWriteRequest, P.decodeRegionWriteRequest, combos({ offset: U64, region: U32, count: [0], data: [Buffer.alloc(0)] }));
    rt(P.encodeRegionWriteReply, P.decodeRegionWriteReply, combos({ offset: U64, region: U32, count: U32 }));
  });

  it("DMA_READ / DMA_WRITE", () => {
    const data = Buffer.alloc(4096, 0x5a);
    rt(P.encodeDmaReadRequest, P.decodeDmaReadRequest, combos({ address: U64, count: U64 }));
    rt(P.encodeDmaReadReply, P.decodeDmaReadReply, combos({ address: U64, count: [4096n], data: [data] }));
    rt(P.encodeDmaWriteRequest, P.decodeDmaWriteRequest, combos({ address: U64, count: [4096n], data: [data] }));
    rt(P.encodeDmaWriteReply, P.decodeDmaWriteReply, [...combos({ address: U64, count: U32 }), {}]);
  });

  it("REGION_WRITE_MULTI", () => {
    const wrs: P.RegionWriteMultiEntry[] = [];
    for (let i = 0; i < P.REGION_WRITE_MULTI_MAX; i++) {
      wrs.push({ offset: U64[i % 4], region: U32[i % 3], data: Buffer.alloc(i % 9, i) });
    }
    rt(P.encodeRegionWriteMultiRequest, P.decodeRegionWriteMultiRequest, [{ wrs }, { wrs: [] }]);
    rt(P.encodeRegionWriteMultiReply, P.decodeRegionWriteMultiReply, U64.map((wr_cnt) => ({ wr_cnt })));
  });

  it("DEVICE_FEATURE and its data", () => {
    rt(P.encodeDeviceFeature, P.decodeDeviceFeatureRequest, [
      { argsz: 8, flags: P.FeatureFlags.PROBE | P.FeatureFlags.GET | P.FeatureFlags.SET | 0xffff, data: Buffer.alloc(0) },
      { argsz: 0xffff_ffff, flags: P.FeatureFlags.SET, data: Buffer.alloc(100, 7) },
    ]);
    rt(P.encodeDeviceFeature, P.decodeDeviceFeatureReply, combos({ argsz: U32, flags: U32, data: [Buffer.alloc(0), Buffer.from([9])] }));
    rt(P.encodeFeatureMigration, P.decodeFeatureMigration, U64.map((flags) => ({ flags })));
    rt(P.encodeFeatureMigState, P.decodeFeatureMigState, combos({ device_state: [0, 7], data_fd: [-1, 0, 0x7fff_ffff, -0x8000_0000] }));
    rt(P.encodeDmaLoggingControl, P.decodeDmaLoggingControl, [
      { page_size: U64_MAX, ranges: U64.map((v) => ({ iova: v, length: U64_MAX - v })) },
      { page_size: 0n, ranges: [] },
    ]);
    rt(P.encodeDmaLoggingReportRequest, P.decodeDmaLoggingReportRequest, combos({ iova: U64, length: U64, page_size: [1n, 4096n, 1n << 63n] }));
    rt(P.encodeDmaLoggingReportReply, P.decodeDmaLoggingReportReply, combos({ iova: U64, length: U64, page_size: U64, bitmap: [Buffer.alloc(0), Buffer.alloc(16, 0xff)] }));
    rt(P.encodeFeatureMigDataSize, P.decodeFeatureMigDataSize, U64.map((stop_copy_length) => ({ stop_copy_length })));
  });

  it("MIG_DATA_READ / MIG_DATA_WRITE / MIG_GET_PRECOPY_INFO", () => {
    const data = Buffer.alloc(1000, 3);
    rt(P.encodeMigDataReadRequest, P.decodeMigDataReadRequest, combos({ argsz: [8, 0xffff_ffff], size: U32 }));
    rt(P.encodeMigDataReadReply, P.decodeMigDataReadReply, combos({ argsz: U32, size: [1000], data: [data] }));
    rt(P.encodeMigDataWriteRequest, P.decodeMigDataWriteRequest, combos({ argsz: U32, size: [0], data: [Buffer.alloc(0)] }));
    rt(P.encodeMigGetPrecopyInfoRequest, P.decodeMigGetPrecopyInfoRequest, [{ argsz: 24, flags: 0 }, { argsz: 0xffff_ffff, flags: 0 }]);
    rt(P.encodeMigGetPrecopyInfoReply, P.decodeMigGetPrecopyInfoReply, combos({ argsz: U32, flags: U32, initial_bytes: U64, dirty_bytes: U64 }));
  });
});

describe("decoded data aliases the input", () => {
  it("REGION_WRITE data is a view of the body", () => {
    const body = P.encodeRegionWriteRequest({ offset: 0n, region: 0, count: 4, data: Buffer.from([1, 2, 3, 4]) });
    const msg = P.decodeRegionWriteRequest(body);
    body[16] = 0xee;
    expect(msg.data[0]).toBe(0xee);
    expect(msg.data.buffer).toBe(body.buffer);
  });

  it("a plain Uint8Array input works and is aliased too", () => {
    const u8 = new Uint8Array(P.encodeMigDataWriteRequest({ argsz: 8, size: 2, data: Buffer.from([5, 6]) }));
    const msg = P.decodeMigDataWriteRequest(u8);
    expect(msg.data.buffer).toBe(u8.buffer);
    expect([...msg.data]).toEqual([5, 6]);
  });
});

describe("encoders refuse values their fields cannot carry", () => {
  it.each<[string, () => unknown]>([
    ["u32 2^32", () => P.encodeDeviceGetInfoReply({ argsz: 2 ** 32, flags: 0, num_regions: 0, num_irqs: 0 })],
    ["u32 negative", () => P.encodeRegionReadRequest({ offset: 0n, region: -1, count: 0 })],
    ["u32 fraction", () => P.encodeRegionReadRequest({ offset: 0n, region: 1.5, count: 0 })],
    ["u64 2^64", () => P.encodeDmaReadRequest({ address: 1n << 64n, count: 0n })],
    ["u64 negative", () => P.encodeDmaReadRequest({ address: -1n, count: 0n })],
    ["u16 major 65536", () => P.encodeVersion({ major: 65536, minor: 0, data: "" })],
    ["NUL in version data", () => P.encodeVersion({ major: 0, minor: 0, data: "a\0b" })],
    ["s32 data_fd 2^31", () => P.encodeFeatureMigState({ device_state: 1, data_fd: 2 ** 31 })],
    ["count != data length", () => P.encodeRegionReadReply({ offset: 0n, region: 0, count: 3, data: Buffer.alloc(2) })],
    ["DMA count != data length", () => P.encodeDmaWriteRequest({ address: 0n, count: 3n, data: Buffer.alloc(2) })],
    ["write-multi entry of 9 bytes", () => P.encodeRegionWriteMultiRequest({ wrs: [{ offset: 0n, region: 0, data: Buffer.alloc(9) }] })],
    ["write-multi of 201 entries", () => P.encodeRegionWriteMultiRequest({ wrs: new Array(201).fill({ offset: 0n, region: 0, data: Buffer.alloc(0) }) })],
    ["caps without CAPS flag", () => P.encodeDeviceGetRegionInfoReply({ argsz: 48, flags: 0, index: 0, cap_offset: 32, size: 0n, offset: 0n, caps: [P.typeCap(1, 1)] })],
    ["caps inside the fixed part", () => P.encodeDeviceGetRegionInfoReply({ argsz: 48, flags: 8, index: 0, cap_offset: 16, size: 0n, offset: 0n, caps: [P.typeCap(1, 1)] })],
    ["io fds count mismatch", () => P.encodeDeviceGetRegionIoFdsReply({ argsz: 56, flags: 0, index: 0, count: 2, sub_regions: [{ offset: 0n, size: 0n, fd_index: 0, type: 0, flags: 0, datamatch: 0n }] })],
    ["bitmap not whole u64s", () => P.encodeDmaLoggingReportReply({ iova: 0n, length: 0n, page_size: 1n, bitmap: Buffer.alloc(3) })],
  ])("%s", (_name, fn) => {
    expect(fn).toThrow(RangeError);
  });
});

describe("dmaLoggingBitmapSize", () => {
  it("rounds pages up to whole u64 words", () => {
    expect(P.dmaLoggingBitmapSize(0n, 4096n)).toBe(0n);
    expect(P.dmaLoggingBitmapSize(1n, 4096n)).toBe(8n);
    expect(P.dmaLoggingBitmapSize(16n * 4096n, 4096n)).toBe(8n);
    expect(P.dmaLoggingBitmapSize(64n * 4096n, 4096n)).toBe(8n);
    expect(P.dmaLoggingBitmapSize(65n * 4096n, 4096n)).toBe(16n);
    expect(P.dmaLoggingBitmapSize(1n << 40n, 4096n)).toBe((1n << 28n) / 8n);
  });
});

/**
 * An independent second encoder: every fixed-layout struct is described
 * again with buffer-layout (which has no u64, so each u64 is a lo/hi pair of
 * u32s) and random values are pushed through both. Our encoder must produce
 * the same bytes, and our decoder must read buffer-layout's bytes back.
 */
import * as lo from "buffer-layout";
import { describe, expect, it } from "vitest";
import * as P from "../../../protocol/index.ts";
import { prng, randInt, randU32, randU64, toHex } from "./helpers.ts";

type Layout = lo.Layout<Record<string, unknown>>;
const rand = prng(0xc0ffee);
const SAMPLES = 200;

/** buffer-layout fields for a u64 named `name`. */
function u64(name: string): lo.Layout<unknown>[] {
  return [lo.u32(`${name}_lo`), lo.u32(`${name}_hi`)] as lo.Layout<unknown>[];
}

/** Splits bigint fields into the lo/hi pair buffer-layout expects. */
function split(obj: Record<string, unknown>): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(obj)) {
    if (typeof v === "bigint") {
      out[`${k}_lo`] = Number(v & 0xffff_ffffn);
      out[`${k}_hi`] = Number(v >> 32n);
    } else {
      out[k] = v;
    }
  }
  return out;
}

function layoutEncode(layout: Layout, obj: Record<string, unknown>, size = layout.span): Buffer {
  const buf = Buffer.alloc(size);
  layout.encode(split(obj), buf, 0);
  return buf;
}

function struct(fields: lo.Layout<unknown>[]): Layout {
  return lo.struct(fields) as Layout;
}

/** Checks one struct: same bytes from both encoders, and our decoder reads buffer-layout's bytes. */
function crossCheck<T extends object>(
  name: string,
  layout: Layout,
  gen: () => T,
  encode: (m: T) => Uint8Array,
  decode: ((b: Uint8Array) => T) | null,
): void {
  it(name, () => {
    for (let i = 0; i < SAMPLES; i++) {
      const msg = gen();
      const theirs = layoutEncode(layout, msg as Record<string, unknown>);
      expect(toHex(encode(msg))).toBe(toHex(theirs));
      if (decode) expect(decode(theirs)).toEqual(msg);
    }
  });
}

const u32s = (...names: string[]) => names.map((n) => lo.u32(n)) as lo.Layout<unknown>[];

describe("buffer-layout cross-check of the fixed layouts", () => {
  crossCheck(
    "header",
    struct([lo.u16("msgId"), lo.u16("command"), ...u32s("size", "flags", "error")] as lo.Layout<unknown>[]),
    () => ({ msgId: randInt(rand, 0x10000), command: randInt(rand, 0x10000), size: randU32(rand), flags: randU32(rand), error: randU32(rand) }),
    P.encodeHeader,
    (b) => P.decodeHeader(b),
  );

  crossCheck(
    "DMA_MAP request",
    struct([...u32s("argsz", "flags"), ...u64("offset"), ...u64("address"), ...u64("size")]),
    () => ({ argsz: 32 + randInt(rand, 100), flags: randInt(rand, 4), offset: randU64(rand), address: randU64(rand), size: randU64(rand) }),
    P.encodeDmaMapRequest,
    P.decodeDmaMapRequest,
  );

  crossCheck(
    "DMA_UNMAP reply",
    struct([...u32s("argsz", "flags"), ...u64("address"), ...u64("size")]),
    () => ({ argsz: randU32(rand), flags: randU32(rand), address: randU64(rand), size: randU64(rand) }),
    P.encodeDmaUnmapReply,
    P.decodeDmaUnmapReply,
  );

  crossCheck(
    "DEVICE_GET_INFO reply",
    struct(u32s("argsz", "flags", "num_regions", "num_irqs")),
    () => ({ argsz: randU32(rand), flags: randU32(rand), num_regions: randU32(rand), num_irqs: randU32(rand) }),
    P.encodeDeviceGetInfoReply,
    P.decodeDeviceGetInfoReply,
  );

  crossCheck(
    "DEVICE_GET_IRQ_INFO reply",
    struct(u32s("argsz", "flags", "index", "count")),
    () => ({ argsz: randU32(rand), flags: randU32(rand), index: randU32(rand), count: randU32(rand) }),
    P.encodeDeviceGetIrqInfoReply,
    P.decodeDeviceGetIrqInfoReply,
  );

  crossCheck(
    "DEVICE_GET_REGION_INFO reply, fixed part",
    struct([...u32s("argsz", "flags", "index", "cap_offset"), ...u64("size"), ...u64("offset")]),
    () => ({
      argsz: 32 + randInt(rand, 1000),
      flags: (randU32(rand) & ~P.RegionInfoFlags.CAPS) >>> 0,
      index: randU32(rand),
      cap_offset: randU32(rand),
      size: randU64(rand),
      offset: randU64(rand),
      caps: [],
    }),
    P.encodeDeviceGetRegionInfoReply,
    P.decodeDeviceGetRegionInfoReply,
  );

  it("sparse mmap and type capabilities", () => {
    const area = struct([...u64("offset"), ...u64("size")]);
    for (let i = 0; i < SAMPLES; i++) {
      const areas = Array.from({ length: randInt(rand, 5) }, () => ({ offset: randU64(rand), size: randU64(rand) }));
      const type = randU32(rand);
      const subtype = randU32(rand);
      const sparseSize = 16 + 16 * areas.length;
      const reply = P.regionInfoReply(
        { flags: 7, index: 0, size: 0n, offset: 0n, caps: [P.sparseMmapCap(areas), P.typeCap(type, subtype)] },
        0xffff_ffff,
      );
      const fixed = struct([...u32s("argsz", "flags", "index", "cap_offset"), ...u64("size"), ...u64("offset")]);
      const sparse = struct([
        lo.u16("id"),
        lo.u16("version"),
        ...u32s("next", "nr_areas", "reserved"),
        lo.seq(area, areas.length, "areas"),
      ] as lo.Layout<unknown>[]);
      const typeCap = struct([lo.u16("id"), lo.u16("version"), ...u32s("next", "type", "subtype")] as lo.Layout<unknown>[]);
      const theirs = Buffer.concat([
        layoutEncode(fixed, { argsz: 32 + sparseSize + 16, flags: 0xf, index: 0, cap_offset: 32, size: 0n, offset: 0n }),
        layoutEncode(sparse, { id: 1, version: 1, next: 32 + sparseSize, nr_areas: areas.length, reserved: 0, areas: areas.map(split) }),
        layoutEncode(typeCap, { id: 2, version: 1, next: 0, type, subtype }),
      ]);
      expect(toHex(P.encodeDeviceGetRegionInfoReply(reply))).toBe(toHex(theirs));
      expect(P.decodeDeviceGetRegionInfoReply(theirs)).toEqual(reply);
    }
  });

  it("DEVICE_GET_REGION_IO_FDS reply with sub-regions", () => {
    const fixed = struct(u32s("argsz", "flags", "index", "count"));
    const entry = struct([...u64("offset"), ...u64("size"), ...u32s("fd_index", "type", "flags", "padding"), ...u64("last")]);
    for (let i = 0; i < SAMPLES; i++) {
      const n = randInt(rand, 4);
      const subs: P.SubRegionIoFd[] = Array.from({ length: n }, () => {
        const base = { offset: randU64(rand), size: randU64(rand), fd_index: randU32(rand), flags: randU32(rand) };
        return rand() < 0.5 ? { ...base, type: 0 as const, datamatch: randU64(rand) } : { ...base, type: 1 as const, user_data: randU64(rand) };
      });
      const msg: P.DeviceGetRegionIoFdsReply = { argsz: 16 + 40 * n, flags: 0, index: randU32(rand), count: n, sub_regions: subs };
      const theirs = Buffer.concat([
        layoutEncode(fixed, { argsz: msg.argsz, flags: 0, index: msg.index, count: n }),
        ...subs.map((s) =>
          layoutEncode(entry, {
            offset: s.offset,
            size: s.size,
            fd_index: s.fd_index,
            type: s.type,
            flags: s.flags,
            padding: 0,
            last: s.type === 0 ? s.datamatch : s.user_data,
          }),
        ),
      ]);
      expect(toHex(P.encodeDeviceGetRegionIoFdsReply(msg))).toBe(toHex(theirs));
      expect(P.decodeDeviceGetRegionIoFdsReply(theirs)).toEqual(msg);
    }
  });

  crossCheck(
    "DEVICE_SET_IRQS request, fixed part",
    struct(u32s("argsz", "flags", "index", "start", "count")),
    () => ({
      argsz: 20 + randInt(rand, 100),
      flags: [0x21, 0x24, 0x09, 0x14, 0x11, 0x0c][randInt(rand, 6)],
      index: randU32(rand),
      start: randU32(rand),
      count: randU32(rand),
    }),
    P.encodeDeviceSetIrqsRequest,
    P.decodeDeviceSetIrqsRequest,
  );

  crossCheck(
    "REGION_READ request / REGION_WRITE reply",
    struct([...u64("offset"), ...u32s("region", "count")]),
    () => ({ offset: randU64(rand), region: randU32(rand), count: randU32(rand) }),
    P.encodeRegionReadRequest,
    P.decodeRegionWriteReply,
  );

  crossCheck(
    "DMA_READ request",
    struct([...u64("address"), ...u64("count")]),
    () => ({ address: randU64(rand), count: randU64(rand) }),
    P.encodeDmaReadRequest,
    P.decodeDmaReadRequest,
  );

  crossCheck(
    "DMA_WRITE reply",
    struct([...u64("address"), lo.u32("count")] as lo.Layout<unknown>[]),
    () => ({ address: randU64(rand), count: randU32(rand) }),
    P.encodeDmaWriteReply,
    P.decodeDmaWriteReply,
  );

  it("REGION_WRITE_MULTI request", () => {
    const entry = struct([...u64("offset"), ...u32s("region", "count"), lo.blob(8, "data")] as lo.Layout<unknown>[]);
    for (let i = 0; i < SAMPLES; i++) {
      const wrs = Array.from({ length: randInt(rand, 10) }, () => {
        const n = randInt(rand, 9);
        return { offset: randU64(rand), region: randU32(rand), data: Buffer.from(Array.from({ length: n }, () => randInt(rand, 256))) };
      });
      const theirs = Buffer.concat([
        layoutEncode(struct(u64("wr_cnt")), { wr_cnt: BigInt(wrs.length) }),
        ...wrs.map((w) => {
          const data = Buffer.alloc(8);
          w.data.copy(data);
          return layoutEncode(entry, { offset: w.offset, region: w.region, count: w.data.length, data });
        }),
      ]);
      expect(toHex(P.encodeRegionWriteMultiRequest({ wrs }))).toBe(toHex(theirs));
      expect(P.decodeRegionWriteMultiRequest(theirs)).toEqual({ wrs });
    }
  });

  crossCheck(
    "MIG_DEVICE_STATE data",
    struct([lo.u32("device_state"), lo.s32("data_fd")] as lo.Layout<unknown>[]),
    () => ({ device_state: randInt(rand, 8), data_fd: randU32(rand) - 0x8000_0000 }),
    P.encodeFeatureMigState,
    P.decodeFeatureMigState,
  );

  it("DMA_LOGGING_START/STOP data with ranges", () => {
    const range = struct([...u64("iova"), ...u64("length")]);
    for (let i = 0; i < SAMPLES; i++) {
      const ranges = Array.from({ length: randInt(rand, 6) }, () => ({ iova: randU64(rand), length: randU64(rand) }));
      const layout = struct([...u64("page_size"), ...u32s("num_ranges", "reserved"), lo.seq(range, ranges.length, "ranges")] as lo.Layout<unknown>[]);
      const msg = { page_size: randU64(rand), ranges };
      const theirs = layoutEncode(layout, { page_size: msg.page_size, num_ranges: ranges.length, reserved: 0, ranges: ranges.map(split) });
      expect(toHex(P.encodeDmaLoggingControl(msg))).toBe(toHex(theirs));
      expect(P.decodeDmaLoggingControl(theirs)).toEqual(msg);
    }
  });

  crossCheck(
    "DMA_LOGGING_REPORT request data",
    struct([...u64("iova"), ...u64("length"), ...u64("page_size")]),
    () => ({ iova: randU64(rand), length: randU64(rand), page_size: 1n << BigInt(randInt(rand, 64)) }),
    P.encodeDmaLoggingReportRequest,
    P.decodeDmaLoggingReportRequest,
  );

  crossCheck(
    "MIG_DATA_READ request",
    struct(u32s("argsz", "size")),
    () => ({ argsz: 8 + randInt(rand, 0x1_0000), size: randU32(rand) }),
    P.encodeMigDataReadRequest,
    P.decodeMigDataReadRequest,
  );

  crossCheck(
    "MIG_GET_PRECOPY_INFO reply (extension)",
    struct([...u32s("argsz", "flags"), ...u64("initial_bytes"), ...u64("dirty_bytes")]),
    () => ({ argsz: randU32(rand), flags: randU32(rand), initial_bytes: randU64(rand), dirty_bytes: randU64(rand) }),
    P.encodeMigGetPrecopyInfoReply,
    P.decodeMigGetPrecopyInfoReply,
  );

  it("DEVICE_FEATURE fixed part", () => {
    const layout = struct(u32s("argsz", "flags"));
    for (let i = 0; i < SAMPLES; i++) {
      const msg = { argsz: randU32(rand), flags: randU32(rand), data: Buffer.alloc(0) };
      const theirs = layoutEncode(layout, msg);
      expect(toHex(P.encodeDeviceFeature(msg))).toBe(toHex(theirs));
      expect(P.decodeDeviceFeatureReply(theirs)).toEqual(msg);
    }
  });

  it("the layouts agree with MessageSize", () => {
    expect(struct([...u32s("argsz", "flags"), ...u64("offset"), ...u64("address"), ...u64("size")]).span).toBe(P.MessageSize.DMA_MAP);
    expect(struct([...u32s("argsz", "flags"), ...u64("a"), ...u64("s")]).span).toBe(P.MessageSize.DMA_UNMAP);
    expect(struct([...u32s("a", "b", "c", "d"), ...u64("s"), ...u64("o")]).span).toBe(P.MessageSize.REGION_INFO);
    expect(struct([...u64("o"), ...u64("s"), ...u32s("f", "t", "g", "p"), ...u64("d")]).span).toBe(P.MessageSize.SUB_REGION_IO_FD);
    expect(struct([...u64("o"), ...u32s("r", "c"), lo.blob(8, "d")] as lo.Layout<unknown>[]).span).toBe(P.MessageSize.REGION_WRITE_MULTI_ENTRY);
    expect(struct([...u32s("a", "f"), ...u64("i"), ...u64("d")]).span).toBe(P.MessageSize.PRECOPY_INFO);
  });
});

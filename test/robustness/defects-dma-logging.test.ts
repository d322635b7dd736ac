/**
 * Dirty-page logging as negotiated (issue 9, part 2, items 3 and 10):
 *
 * - VERSION advertises a max_bitmap_size (QEMU's migration capability) and
 *   DMA_LOGGING_REPORT serves every bitmap up to it, also above
 *   max_data_xfer_size: that limit is for data transfer messages (spec:
 *   "Read and Write Operations"); a DEVICE_FEATURE reply is bounded by the
 *   request's argsz (spec: "Message sizes"), and QEMU's client takes a reply
 *   as large as the buffer it asked with. 1 MiB of bitmap covers only 32 GiB
 *   of guest at 4 KiB pages. What is advertised is what the client offered
 *   or less, never more than is served.
 * - the negotiated migration pgsize is the page size DMA_LOGGING_START uses
 *   when the client gives none (page_size 0; spec: "If the device cannot do
 *   the hinted page size then it's the driver's choice").
 */
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import { BigmemDevice } from "../../devices/bigmem/bigmem.ts";
import { Command, Errno, Feature, FeatureFlags, decodeVersion, parseCapabilities } from "../../protocol/index.ts";
import { VfioUserClient } from "../../src/client/client.ts";
import { RawClient, eventually, le, startInProcessServer, versionBody, waitUntil, type InProcessServer } from "./raw-client.ts";

const GiB = 1n << 30n;
const PAGE = 4096n;
/** A logged range whose bitmap (2 MiB) is twice max_data_xfer_size (1 MiB). */
const RANGE = 64n * GiB;
const BITMAP = Number(RANGE / PAGE / 8n);

const start = (pageSize: bigint, ranges: [bigint, bigint][]): Buffer => {
  const b = le().u64(pageSize).u32(ranges.length).u32(0);
  for (const [iova, length] of ranges) b.u64(iova).u64(length);
  const data = b.buf;
  return le().u32(8 + data.length).u32(Feature.DMA_LOGGING_START | FeatureFlags.SET).bytes(data).buf;
};
const report = (iova: bigint, length: bigint, pageSize: bigint, argsz: number): Buffer =>
  le().u32(argsz).u32(Feature.DMA_LOGGING_REPORT | FeatureFlags.GET).u64(iova).u64(length).u64(pageSize).buf;
const stop = (): Buffer => le().u32(8).u32(Feature.DMA_LOGGING_STOP | FeatureFlags.SET).buf;

/** One connection per case, closed whatever happens, so no case depends on another. */
async function session(srv: InProcessServer, caps: object, fn: (c: RawClient, server: ReturnType<typeof parseCapabilities>) => Promise<void>): Promise<void> {
  expect(await eventually(() => srv.server.connection === null)).toBe(true);
  const c = RawClient.connect(srv.socketPath);
  try {
    const v = await c.request(Command.VERSION, versionBody(caps));
    expect(v.header.error).toBe(0);
    await fn(c, parseCapabilities(decodeVersion(v.body).data));
  } finally {
    srv.server.endpoint.stopDirtyLog();
    c.close();
    await c.waitClosed();
  }
}

describe("DMA_LOGGING_REPORT serves bitmaps up to the advertised max_bitmap_size", () => {
  let srv: InProcessServer;
  beforeAll(() => {
    srv = startInProcessServer({ device: new BigmemDevice({ size: "64K" }) });
  });
  afterAll(() => srv?.stop());

  it("VERSION advertises the smaller of the server's and the client's max_bitmap_size", async () => {
    for (const [offer, expected] of [[256 << 20, 256 << 20], [4 << 20, 4 << 20], [2 ** 40, 256 << 20]] as const) {
      await session(srv, { capabilities: { migration: { pgsize: 4096, max_bitmap_size: offer } } }, async (_c, server) => {
        expect(server.migration?.max_bitmap_size).toBe(expected);
      });
    }
  });

  it(`a 2 MiB bitmap (64 GiB at 4 KiB, twice max_data_xfer_size) is served in one reply, bits where the device wrote`, () =>
    session(srv, { capabilities: { max_data_xfer_size: 1 << 20, migration: { pgsize: 4096, max_bitmap_size: 256 << 20 } } }, async (c) => {
      expect(await c.errno(Command.DEVICE_FEATURE, start(PAGE, [[0n, RANGE]]))).toBe(0);
      const log = srv.server.endpoint.dirtyLog!;
      log.markDirty(40n * GiB + PAGE, 1n);
      log.markDirty(RANGE - 1n, 1n);
      const argsz = 8 + 24 + BITMAP;
      const r = await c.request(Command.DEVICE_FEATURE, report(0n, RANGE, PAGE, argsz));
      expect(r.header.error).toBe(0);
      expect(r.body.readUInt32LE(0)).toBe(argsz);
      const bitmap = r.body.subarray(8 + 24);
      expect(bitmap.length).toBe(BITMAP);
      const set: number[] = [];
      for (let i = 0; i < bitmap.length; i++) {
        for (let b = 0; b < 8; b++) if (bitmap[i]! & (1 << b)) set.push(i * 8 + b);
      }
      expect(set).toEqual([Number((40n * GiB + PAGE) / PAGE), Number(RANGE / PAGE) - 1]);
      expect(await c.errno(Command.DEVICE_FEATURE, stop())).toBe(0);
    }));

  it("a bitmap above the negotiated max_bitmap_size is refused with E2BIG; the log is not cleared", () =>
    session(srv, { capabilities: { migration: { pgsize: 4096, max_bitmap_size: 1 << 20 } } }, async (c) => {
      expect(await c.errno(Command.DEVICE_FEATURE, start(PAGE, [[0n, RANGE]]))).toBe(0);
      srv.server.endpoint.dirtyLog!.markDirty(0n, 1n);
      expect(await c.errno(Command.DEVICE_FEATURE, report(0n, RANGE, PAGE, 8 + 24 + BITMAP))).toBe(Errno.E2BIG);
      // the first 32 GiB (1 MiB of bitmap) fit, and page 0 is still dirty
      const r = await c.request(Command.DEVICE_FEATURE, report(0n, RANGE / 2n, PAGE, 8 + 24 + BITMAP / 2));
      expect(r.header.error).toBe(0);
      expect(r.body[8 + 24]! & 1).toBe(1);
      expect(await c.errno(Command.DEVICE_FEATURE, stop())).toBe(0);
    }));

  it("this repo's client asks for and takes bitmaps up to the negotiated size (one request for 2 MiB)", async () => {
    await waitUntil(() => srv.server.connection === null, "the server to let go of the client");
    const client = await VfioUserClient.connect(srv.socketPath);
    try {
      await client.negotiate();
      expect(await client.dmaLoggingStart(PAGE, [{ iova: 0n, length: RANGE }])).toBe(PAGE);
      srv.server.endpoint.dirtyLog!.markDirty(RANGE - PAGE, 1n);
      const requests = vi.spyOn(client, "feature");
      const bitmap = await client.dmaLoggingReport(0n, RANGE, PAGE);
      expect(bitmap.length).toBe(BITMAP);
      expect(bitmap[BITMAP - 1]).toBe(0x80);
      expect(requests).toHaveBeenCalledTimes(1);
      requests.mockRestore();
      await client.dmaLoggingStop();
    } finally {
      client.close();
    }
  });
});

describe("the negotiated migration pgsize is DMA_LOGGING_START's page size when the client gives none", () => {
  let srv: InProcessServer;
  beforeAll(() => {
    srv = startInProcessServer({ device: new BigmemDevice({ size: "64K" }), limits: { migrationPgsize: 0x1000n | 0x10000n } });
  });
  afterAll(() => srv?.stop());

  const pageSizeOf = (r: { body: Buffer }) => r.body.readBigUInt64LE(8);

  it("client pgsize 64 KiB: VERSION answers 64 KiB and page_size 0 starts logging at 64 KiB", () =>
    session(srv, { capabilities: { migration: { pgsize: 0x10000, max_bitmap_size: 1 << 20 } } }, async (c, server) => {
      expect(server.migration?.pgsize).toBe(0x10000n);
      const r = await c.request(Command.DEVICE_FEATURE, start(0n, [[0n, 1n << 20n]]));
      expect(r.header.error).toBe(0);
      expect(pageSizeOf(r)).toBe(0x10000n);
      expect(srv.server.endpoint.dirtyLog!.pageSize).toBe(0x10000n);
      expect(await c.errno(Command.DEVICE_FEATURE, stop())).toBe(0);
    }));

  it("no migration capability from the client: the server's smallest page size (4 KiB)", () =>
    session(srv, { capabilities: {} }, async (c) => {
      const r = await c.request(Command.DEVICE_FEATURE, start(0n, [[0n, 1n << 20n]]));
      expect(r.header.error).toBe(0);
      expect(pageSizeOf(r)).toBe(0x1000n);
      expect(await c.errno(Command.DEVICE_FEATURE, stop())).toBe(0);
    }));

  it("an explicit supported page size is still honoured", () =>
    session(srv, { capabilities: { migration: { pgsize: 0x10000, max_bitmap_size: 1 << 20 } } }, async (c) => {
      const r = await c.request(Command.DEVICE_FEATURE, start(0x2000n, [[0n, 1n << 20n]]));
      expect(pageSizeOf(r)).toBe(0x2000n);
      expect(await c.errno(Command.DEVICE_FEATURE, stop())).toBe(0);
    }));
});

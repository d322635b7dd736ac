/**
 * The client conformance report, one detector at a time: a raw client (the
 * protocol codecs only, so nothing of src/client can hide a mistake) makes
 * each mistake on purpose against a server of its own with the report on,
 * and the report must name it exactly once, with its id, severity, section,
 * the message id, command and offset of the bad field. Then: the same
 * script of good and bad messages gets byte-identical replies from a server
 * with and without the report.
 */
import { afterEach, describe, expect, it } from "vitest";
import {
  Command,
  Feature,
  FeatureFlags,
  HEADER_SIZE,
  HeaderFlags,
  MigState,
  RegionIndex,
  encodeHeader,
  type Frame,
} from "../../protocol/index.ts";
import { DEVIATIONS, type DeviationId, type DeviationRecord } from "../../src/conformance/index.ts";
import { RawClient, eventually, frameBytes, le, memfd, sleep, startInProcessServer, versionBody, type InProcessServer } from "./raw-client.ts";
import { native } from "../../src/transport/native.ts";

const INCOMPLETE_MS = 150;

type Bench = InProcessServer & { c: RawClient };

let bench: Bench | null = null;

afterEach(() => {
  if (!bench) return;
  bench.c.close();
  bench.stop();
  bench = null;
});

async function open(opts: { version?: boolean; conformance?: boolean; incompleteFrameMs?: number } = {}): Promise<Bench> {
  const srv = startInProcessServer({
    dirPrefix: "vfu-conf-",
    server: { conformance: opts.conformance === false ? undefined : { incompleteFrameMs: opts.incompleteFrameMs ?? INCOMPLETE_MS } },
  });
  const c = opts.version === false ? RawClient.connect(srv.socketPath) : await RawClient.ready(srv.socketPath);
  bench = { ...srv, c };
  return bench;
}

/** The deviations of the (only) client so far. */
function deviations(b: Bench): DeviationRecord[] {
  const r = b.server.conformance!.report();
  expect(r.clients).toHaveLength(1);
  return r.clients[0]!.deviations;
}

/** Exactly one deviation, the expected one. */
function expectOnly(b: Bench, id: DeviationId, want: { command: string; msgId: number; offset: number | null; count?: number; detail?: RegExp }): DeviationRecord {
  const all = deviations(b);
  expect(all.map((d) => `${d.id} ${d.command}`)).toEqual([`${id} ${want.command}`]);
  const d = all[0]!;
  expect(d.severity).toBe(DEVIATIONS[id].severity);
  expect(d.first.msgId).toBe(want.msgId);
  expect(d.first.offset).toBe(want.offset);
  expect(d.count).toBe(want.count ?? 1);
  expect(d.section).toMatch(/^(vfio-user|linux\/vfio\.h|vfio-user-ts extension)/);
  if (want.detail) expect(d.first.detail).toMatch(want.detail);
  return d;
}

const feature = (flags: number, data: Uint8Array = new Uint8Array(0), argsz?: number): Buffer =>
  le().u32(argsz ?? 8 + data.length + 64).u32(flags).bytes(data).buf;
const setState = (state: number): Buffer => feature(Feature.MIG_DEVICE_STATE | FeatureFlags.SET, le().u32(state).s32(-1).buf);
const access = (region: number, offset: bigint, count: number, data?: Uint8Array): Buffer =>
  le().u64(offset).u32(region).u32(count).bytes(data ?? new Uint8Array(0)).buf;
const dmaMap = (address: bigint, size: bigint, argsz = 32, flags = 3): Buffer => le().u32(argsz).u32(flags).u64(0).u64(address).u64(size).buf;
const startLogging = (ranges: [bigint, bigint][]): Buffer => {
  const b = le().u64(4096).u32(ranges.length).u32(0);
  for (const [iova, length] of ranges) b.u64(iova).u64(length);
  return feature(Feature.DMA_LOGGING_START | FeatureFlags.SET, b.buf);
};

async function ok(c: RawClient, command: number, body: Uint8Array): Promise<Frame> {
  const r = await c.request(command, body);
  expect(r.header.error, `${command} refused`).toBe(0);
  return r;
}

async function state(c: RawClient, s: number): Promise<void> {
  await ok(c, Command.DEVICE_FEATURE, setState(s));
}

/** edu's DMA engine moving 64 bytes between its buffer and `ram` (to RAM: DMA_WRITE to the client, else DMA_READ). */
async function eduDma(c: RawClient, ram: bigint, toRam: boolean): Promise<void> {
  await c.write(RegionIndex.CONFIG, 4n, le().u16(0x6).buf); // memory + bus master
  const src = toRam ? 0x40000n : ram;
  const dst = toRam ? ram : 0x40000n;
  await c.write(RegionIndex.BAR0, 0x80n, le().u64(src).buf);
  await c.write(RegionIndex.BAR0, 0x88n, le().u64(dst).buf);
  await c.write(RegionIndex.BAR0, 0x90n, le().u64(64).buf);
  await c.write(RegionIndex.BAR0, 0x98n, le().u64(toRam ? 0x3 : 0x1).buf);
}

describe("each detector names its mistake once: id, severity, section, msgId, command, offset", () => {
  it("version-missing: a command before VERSION", async () => {
    const b = await open({ version: false });
    const id = b.c.send(Command.REGION_READ, access(RegionIndex.CONFIG, 0n, 2));
    expect((await b.c.reply(id)).header.error).not.toBe(0);
    expectOnly(b, "version-missing", { command: "REGION_READ", msgId: id, offset: null });
  });

  it("version-repeated: a second VERSION", async () => {
    const b = await open();
    const id = b.c.send(Command.VERSION, versionBody());
    expect((await b.c.reply(id)).header.error).not.toBe(0);
    expectOnly(b, "version-repeated", { command: "VERSION", msgId: id, offset: null });
  });

  it("unknown-command: command 14 (not in the Commands table)", async () => {
    const b = await open();
    const id = b.c.send(14, le().u32(0).buf);
    // refused (this server answers ENOSYS) or the connection closes, by the frame decoder's rule; named either way
    await b.c.until(() => b.c.hasReply(id) || b.c.closed, 5000, "a reply or the close");
    expectOnly(b, "unknown-command", { command: "command 14", msgId: id, offset: null });
  });

  it("server-command: the client sends DMA_READ", async () => {
    const b = await open();
    const id = b.c.send(Command.DMA_READ, le().u64(0x1000).u64(4).buf);
    await b.c.reply(id);
    expectOnly(b, "server-command", { command: "DMA_READ", msgId: id, offset: null });
  });

  it("bad-frame: a header whose size is under 16", async () => {
    const b = await open();
    b.c.sendRaw(encodeHeader({ msgId: 0x77, command: Command.REGION_READ, size: 8, flags: 0, error: 0 }));
    await b.c.waitClosed();
    expectOnly(b, "bad-frame", { command: "REGION_READ", msgId: 0x77, offset: null, detail: /smaller than the 16-byte header/ });
  });

  it("frame-incomplete: a header announcing 64 body bytes, 10 of them sent, then nothing", async () => {
    const b = await open();
    const head = encodeHeader({ msgId: 0x1234, command: Command.MIG_DATA_WRITE, size: HEADER_SIZE + 64, flags: 0, error: 0 });
    b.c.sendRaw([head, Buffer.alloc(10)]);
    expect(await eventually(() => deviations(b).length > 0, 5000)).toBe(true);
    expectOnly(b, "frame-incomplete", { command: "MIG_DATA_WRITE", msgId: 0x1234, offset: 10, detail: /26 of the 80 bytes/ });
    // the rest arrives late: the frame is served (refused: RUNNING), named once
    b.c.sendRaw(Buffer.alloc(54));
    expect((await b.c.reply(0x1234)).header.error).not.toBe(0);
    expect(deviations(b).map((d) => d.id)).toEqual(["frame-incomplete", "mig-data-write-state"]);
  });

  it("frame-incomplete is not named for a frame that completes within the timeout", async () => {
    const b = await open({ incompleteFrameMs: 1000 });
    const body = access(RegionIndex.CONFIG, 0n, 2);
    const bytes = frameBytes({ msgId: 9, command: Command.REGION_READ, flags: 0, error: 0 }, body);
    b.c.sendRaw(bytes.subarray(0, 20));
    await sleep(10);
    b.c.sendRaw(bytes.subarray(20));
    expect((await b.c.reply(9)).header.error).toBe(0);
    await sleep(1200);
    expect(deviations(b)).toEqual([]);
  });

  it("header-reserved: a command whose Error field is set (accepted)", async () => {
    const b = await open();
    const id = b.c.send(Command.REGION_READ, access(RegionIndex.CONFIG, 0n, 2), { error: 5 });
    expect((await b.c.reply(id)).header.error).toBe(0);
    expectOnly(b, "header-reserved", { command: "REGION_READ", msgId: id, offset: null });
  });

  it("body-size: DEVICE_GET_INFO with a 12-byte body", async () => {
    const b = await open();
    const id = b.c.send(Command.DEVICE_GET_INFO, le().u32(16).u32(0).u32(0).buf);
    await b.c.reply(id);
    expectOnly(b, "body-size", { command: "DEVICE_GET_INFO", msgId: id, offset: 12 });
  });

  it("argsz-too-small: DEVICE_GET_INFO with argsz 8", async () => {
    const b = await open();
    const id = b.c.send(Command.DEVICE_GET_INFO, le().u32(8).u32(0).u32(0).u32(0).buf);
    await b.c.reply(id);
    expectOnly(b, "argsz-too-small", { command: "DEVICE_GET_INFO", msgId: id, offset: 0 });
  });

  it("argsz-mismatch: DMA_MAP with argsz 40 (accepted)", async () => {
    const b = await open();
    const id = b.c.send(Command.DMA_MAP, dmaMap(0x100000n, 0x1000n, 40));
    expect((await b.c.reply(id)).header.error).toBe(0);
    expectOnly(b, "argsz-mismatch", { command: "DMA_MAP", msgId: id, offset: 0 });
  });

  it("must-be-zero: DEVICE_GET_REGION_INFO with cap_offset set", async () => {
    const b = await open();
    const id = b.c.send(Command.DEVICE_GET_REGION_INFO, le().u32(32).u32(0).u32(0).u32(4).u64(0).u64(0).buf);
    await b.c.reply(id);
    expectOnly(b, "must-be-zero", { command: "DEVICE_GET_REGION_INFO", msgId: id, offset: 12 });
  });

  it("undefined-flags: DMA_MAP with flag bit 8", async () => {
    const b = await open();
    const id = b.c.send(Command.DMA_MAP, dmaMap(0x100000n, 0x1000n, 32, 0x103));
    await b.c.reply(id);
    expectOnly(b, "undefined-flags", { command: "DMA_MAP", msgId: id, offset: 4 });
  });

  it("count-mismatch: REGION_WRITE with count 8 and 4 data bytes", async () => {
    const b = await open();
    const id = b.c.send(Command.REGION_WRITE, le().u64(4).u32(RegionIndex.BAR0).u32(8).u32(0).buf);
    await b.c.reply(id);
    expectOnly(b, "count-mismatch", { command: "REGION_WRITE", msgId: id, offset: 12 });
  });

  it("feature-get-data: GET MIGRATION with 8 bytes of data (accepted)", async () => {
    const b = await open();
    const id = b.c.send(Command.DEVICE_FEATURE, feature(Feature.MIGRATION | FeatureFlags.GET, Buffer.alloc(8), 16));
    expect((await b.c.reply(id)).header.error).toBe(0);
    expectOnly(b, "feature-get-data", { command: "DEVICE_FEATURE", msgId: id, offset: 8 });
  });

  it("dma-unmap-all: DMA_UNMAP with VFIO_DMA_UNMAP_FLAG_ALL (accepted)", async () => {
    const b = await open();
    const id = b.c.send(Command.DMA_UNMAP, le().u32(24).u32(2).u64(0).u64(0).buf);
    expect((await b.c.reply(id)).header.error).toBe(0);
    expectOnly(b, "dma-unmap-all", { command: "DMA_UNMAP", msgId: id, offset: 4 });
  });

  it("dma-logging-ranges-not-inline: DMA_LOGGING_START in linux/vfio.h's layout (a ranges pointer at offset 16)", async () => {
    const b = await open();
    const data = le().u64(4096).u32(1).u32(0).u64(0x7f0012345678n).buf;
    const id = b.c.send(Command.DEVICE_FEATURE, feature(Feature.DMA_LOGGING_START | FeatureFlags.SET, data, 8 + data.length));
    expect((await b.c.reply(id)).header.error).not.toBe(0);
    expectOnly(b, "dma-logging-ranges-not-inline", { command: "DEVICE_FEATURE", msgId: id, offset: 24, detail: /ranges pointer/ });
  });

  it("dma-logging-report-size: DMA_LOGGING_REPORT as QEMU's prototype sends it (32-byte struct, then a bitmap buffer)", async () => {
    const b = await open();
    await ok(b.c, Command.DEVICE_FEATURE, startLogging([[0x100000n, 0x10000n]]));
    // 16 pages: one u64 of bitmap
    const data = le().u64(0x100000n).u64(0x10000n).u64(4096).u64(0).u64(0).buf;
    const id = b.c.send(Command.DEVICE_FEATURE, feature(Feature.DMA_LOGGING_REPORT | FeatureFlags.GET, data, 8 + data.length));
    expect((await b.c.reply(id)).header.error).not.toBe(0);
    expectOnly(b, "dma-logging-report-size", { command: "DEVICE_FEATURE", msgId: id, offset: 32, detail: /32-byte struct.*8 bytes of bitmap buffer/ });
  });

  it("dma-logging-not-stopped: the client leaves with DMA logging on; the START's msgId is named", async () => {
    const b = await open();
    const id = b.c.send(Command.DEVICE_FEATURE, startLogging([[0x100000n, 0x10000n]]));
    expect((await b.c.reply(id)).header.error).toBe(0);
    b.c.close();
    expect(await eventually(() => deviations(b).length > 0, 5000)).toBe(true);
    expectOnly(b, "dma-logging-not-stopped", { command: "DEVICE_FEATURE", msgId: id, offset: null });
    // and the table was logged when the client left
    const line = b.logs.find((l) => l.msg === "client conformance report");
    expect(line?.warnings).toBe(1);
    expect((line?.table as string[]).join("\n")).toMatch(/warning\s+dma-logging-not-stopped\s+DEVICE_FEATURE\s+1\s+0x[0-9a-f]{4}\s+-\s+linux\/vfio\.h/);
  });

  it("dma-reply-count: a DMA_READ reply with a u32 count (data at offset 12, QEMU 10.2's layout)", async () => {
    const b = await open();
    await ok(b.c, Command.DMA_MAP, dmaMap(0x100000n, 0x10000n));
    b.c.onServerRequest = (f) => {
      if (f.header.command !== Command.DMA_READ) return;
      const count = Number(f.body.readBigUInt64LE(8));
      const body = le().u64(f.body.readBigUInt64LE(0)).u32(count).bytes(count).buf;
      b.c.sendRaw(frameBytes({ msgId: f.header.msgId, command: Command.DMA_READ, flags: HeaderFlags.TYPE_REPLY, error: 0 }, body));
    };
    await eduDma(b.c, 0x100000n, false);
    await b.c.until(() => b.c.serverRequests.length === 1, 5000, "the DMA_READ");
    expect(await eventually(() => deviations(b).length > 0, 5000)).toBe(true);
    expectOnly(b, "dma-reply-count", { command: "DMA_READ", msgId: b.c.serverRequests[0]!.header.msgId, offset: 8, detail: /count .* but 60 data bytes; its low 32 bits are the 64 asked for: a u32 count, data at offset 12/ });
  });

  it("dma-write-reply-empty: a DMA_WRITE acknowledged with a bare header (accepted)", async () => {
    const b = await open();
    await ok(b.c, Command.DMA_MAP, dmaMap(0x100000n, 0x10000n));
    await eduDma(b.c, 0x100000n, true);
    await b.c.until(() => b.c.serverRequests.length === 1, 5000, "the DMA_WRITE");
    expect(await eventually(() => deviations(b).length > 0, 5000)).toBe(true);
    expectOnly(b, "dma-write-reply-empty", { command: "DMA_WRITE", msgId: b.c.serverRequests[0]!.header.msgId, offset: 0 });
  });

  it("fds-on-reply: a DMA_WRITE reply that brings an fd (closed)", async () => {
    const b = await open();
    await ok(b.c, Command.DMA_MAP, dmaMap(0x100000n, 0x10000n));
    const fd = memfd("vfu-conf-reply-fd", 4096n);
    b.c.onServerRequest = (f) => {
      const body = le().u64(f.body.readBigUInt64LE(0)).u32(Number(f.body.readBigUInt64LE(8))).buf;
      b.c.sendRaw(frameBytes({ msgId: f.header.msgId, command: f.header.command, flags: HeaderFlags.TYPE_REPLY, error: 0 }, body), [fd]);
    };
    await eduDma(b.c, 0x100000n, true);
    await b.c.until(() => b.c.serverRequests.length === 1, 5000, "the DMA_WRITE");
    expect(await eventually(() => deviations(b).length > 0, 5000)).toBe(true);
    native.close(fd);
    expectOnly(b, "fds-on-reply", { command: "DMA_WRITE", msgId: b.c.serverRequests[0]!.header.msgId, offset: null });
  });

  it("reply-unmatched: a reply to no request of the server's (ignored)", async () => {
    const b = await open();
    b.c.sendRaw(frameBytes({ msgId: 0x4242, command: Command.DMA_WRITE, flags: HeaderFlags.TYPE_REPLY, error: 0 }));
    expect(await b.c.vendorId()).toBe(0x1234);
    expectOnly(b, "reply-unmatched", { command: "DMA_WRITE", msgId: 0x4242, offset: null });
  });

  it("fds-unexpected: an fd with REGION_READ", async () => {
    const b = await open();
    const fd = memfd("vfu-conf-fd", 4096n);
    const id = b.c.send(Command.REGION_READ, access(RegionIndex.CONFIG, 0n, 2), { fds: [fd] });
    native.close(fd);
    expect((await b.c.reply(id)).header.error).not.toBe(0);
    expectOnly(b, "fds-unexpected", { command: "REGION_READ", msgId: id, offset: null });
  });

  it("mig-state-arc: STOP_COPY -> PRE_COPY (a request the kernel's FSM refuses)", async () => {
    const b = await open();
    await state(b.c, MigState.STOP_COPY);
    const id = b.c.send(Command.DEVICE_FEATURE, setState(MigState.PRE_COPY));
    expect((await b.c.reply(id)).header.error).not.toBe(0);
    expectOnly(b, "mig-state-arc", { command: "DEVICE_FEATURE", msgId: id, offset: 8, detail: /STOP_COPY -> PRE_COPY is not allowed/ });
  });

  it("mig-state-arc: ERROR requested", async () => {
    const b = await open();
    const id = b.c.send(Command.DEVICE_FEATURE, setState(MigState.ERROR));
    await b.c.reply(id);
    expectOnly(b, "mig-state-arc", { command: "DEVICE_FEATURE", msgId: id, offset: 8 });
  });

  it("mig-data-read-state: MIG_DATA_READ while RUNNING", async () => {
    const b = await open();
    const id = b.c.send(Command.MIG_DATA_READ, le().u32(8 + 4096).u32(4096).buf);
    await b.c.reply(id);
    expectOnly(b, "mig-data-read-state", { command: "MIG_DATA_READ", msgId: id, offset: null });
  });

  it("mig-data-write-state: MIG_DATA_WRITE while RUNNING", async () => {
    const b = await open();
    const id = b.c.send(Command.MIG_DATA_WRITE, le().u32(8).u32(4).u32(0).buf);
    await b.c.reply(id);
    expectOnly(b, "mig-data-write-state", { command: "MIG_DATA_WRITE", msgId: id, offset: null });
  });

  it("mig-data-read-after-end: STOP_COPY, read to the empty reply, then once more (answered empty)", async () => {
    const b = await open();
    await state(b.c, MigState.STOP_COPY);
    const read = le().u32(8 + 65536).u32(65536).buf;
    for (let i = 0; i < 100; i++) {
      const r = await ok(b.c, Command.MIG_DATA_READ, read);
      if (r.body.readUInt32LE(4) === 0) break;
    }
    expect(deviations(b)).toEqual([]);
    const id = b.c.send(Command.MIG_DATA_READ, read);
    const r = await b.c.reply(id);
    expect(r.header.error).toBe(0);
    expect(r.body.readUInt32LE(4)).toBe(0);
    expectOnly(b, "mig-data-read-after-end", { command: "MIG_DATA_READ", msgId: id, offset: null });
  });

  it("argsz-zero: MIG_GET_PRECOPY_INFO as a 24-byte all-zero struct (accepted as argsz 24)", async () => {
    const b = await open();
    await state(b.c, MigState.PRE_COPY);
    const id = b.c.send(Command.MIG_GET_PRECOPY_INFO, Buffer.alloc(24));
    expect((await b.c.reply(id)).header.error).toBe(0);
    expectOnly(b, "argsz-zero", { command: "MIG_GET_PRECOPY_INFO", msgId: id, offset: 0 });
  });

  it("precopy-info-state: MIG_GET_PRECOPY_INFO while RUNNING", async () => {
    const b = await open();
    const id = b.c.send(Command.MIG_GET_PRECOPY_INFO, le().u32(24).u32(0).buf);
    await b.c.reply(id);
    expectOnly(b, "precopy-info-state", { command: "MIG_GET_PRECOPY_INFO", msgId: id, offset: null });
  });

  it("request-refused: anything else the server refuses, with its reason (a region that does not exist)", async () => {
    const b = await open();
    const id = b.c.send(Command.REGION_READ, access(3, 0n, 4));
    await b.c.reply(id);
    expectOnly(b, "request-refused", { command: "REGION_READ", msgId: id, offset: null, detail: /region 3 does not exist/ });
  });

  it("a mistake repeated is one row with its count; the first msgId stays", async () => {
    const b = await open();
    const ids = [];
    for (let i = 0; i < 3; i++) {
      const id = b.c.send(Command.DEVICE_GET_INFO, le().u32(8).u32(0).u32(0).u32(0).buf);
      ids.push(id);
      await b.c.reply(id);
    }
    expectOnly(b, "argsz-too-small", { command: "DEVICE_GET_INFO", msgId: ids[0]!, offset: 0, count: 3 });
  });

  it("a well-behaved session names nothing", async () => {
    const b = await open();
    expect(await b.c.vendorId()).toBe(0x1234);
    await ok(b.c, Command.DMA_MAP, dmaMap(0x100000n, 0x10000n));
    await ok(b.c, Command.DEVICE_FEATURE, feature(Feature.MIGRATION | FeatureFlags.GET));
    await state(b.c, MigState.PRE_COPY);
    await ok(b.c, Command.MIG_GET_PRECOPY_INFO, le().u32(24).u32(0).buf);
    await state(b.c, MigState.RUNNING);
    expect(deviations(b)).toEqual([]);
  });
});

/**
 * A script of good and bad messages: both servers must answer it with the
 * same bytes (the report observes; it never answers).
 */
describe("the report changes no reply", () => {
  const script: [number, Buffer, number?][] = [
    [Command.REGION_READ, access(RegionIndex.CONFIG, 0n, 4)],
    [Command.DEVICE_GET_INFO, le().u32(8).u32(0).u32(0).u32(0).buf],
    [Command.DEVICE_GET_INFO, le().u32(16).u32(0).u32(0).u32(0).buf],
    [Command.DEVICE_GET_REGION_INFO, le().u32(32).u32(0).u32(0).u32(4).u64(0).u64(0).buf],
    [Command.DMA_MAP, dmaMap(0x100000n, 0x10000n, 40)],
    [Command.DMA_MAP, dmaMap(0x200000n, 0x1000n, 32, 0x103)],
    [Command.DEVICE_FEATURE, feature(Feature.MIGRATION | FeatureFlags.GET, Buffer.alloc(8), 16)],
    [Command.DEVICE_FEATURE, feature(Feature.DMA_LOGGING_START | FeatureFlags.PROBE)],
    [Command.DEVICE_FEATURE, feature(Feature.DMA_LOGGING_START | FeatureFlags.SET, le().u64(4096).u32(1).u32(0).u64(0x7f00n).buf, 32)],
    [Command.DEVICE_FEATURE, startLogging([[0x100000n, 0x10000n]])],
    [Command.DEVICE_FEATURE, feature(Feature.DMA_LOGGING_REPORT | FeatureFlags.GET, le().u64(0x100000n).u64(0x10000n).u64(4096).u64(0).u64(0).buf, 48)],
    [Command.DEVICE_FEATURE, feature(Feature.DMA_LOGGING_REPORT | FeatureFlags.GET, le().u64(0x100000n).u64(0x10000n).u64(4096).buf, 40)],
    [Command.MIG_GET_PRECOPY_INFO, Buffer.alloc(24)],
    [Command.DEVICE_FEATURE, setState(MigState.PRE_COPY)],
    [Command.MIG_GET_PRECOPY_INFO, Buffer.alloc(24)],
    [Command.DEVICE_FEATURE, setState(MigState.STOP_COPY)],
    [Command.DEVICE_FEATURE, setState(MigState.PRE_COPY)],
    [Command.MIG_DATA_READ, le().u32(8 + 65536).u32(65536).buf],
    [Command.MIG_DATA_READ, le().u32(8 + 65536).u32(65536).buf],
    [Command.MIG_DATA_READ, le().u32(8 + 65536).u32(65536).buf],
    [Command.MIG_DATA_WRITE, le().u32(8).u32(0).buf],
    [Command.DEVICE_FEATURE, setState(MigState.ERROR)],
    [Command.DMA_READ, le().u64(0).u64(4).buf],
    [Command.VERSION, versionBody()],
    [Command.REGION_READ, access(RegionIndex.CONFIG, 0n, 2), 3],
    [Command.DMA_UNMAP, le().u32(24).u32(2).u64(0).u64(0).buf],
    [Command.DEVICE_RESET, Buffer.alloc(0)],
  ];

  async function run(conformance: boolean): Promise<{ replies: string[]; refused: number; named: number }> {
    const b = await open({ conformance });
    const replies: string[] = [];
    let refused = 0;
    for (const [command, body, error] of script) {
      const r = await b.c.request(command, body, { error });
      if (r.header.error !== 0) refused++;
      replies.push(`${encodeHeader(r.header).toString("hex")} ${r.body.toString("hex")}`);
    }
    const named = b.server.conformance?.report().clients[0]?.deviations.length ?? 0;
    b.c.close();
    b.stop();
    bench = null;
    return { replies, refused, named };
  }

  it(`${script.length} messages, good and bad, get byte-identical replies with and without the report`, async () => {
    const without = await run(false);
    const withReport = await run(true);
    expect(withReport.replies).toEqual(without.replies);
    // the script did exercise refusals and detectors: not a comparison of two idle sessions
    expect(without.refused).toBeGreaterThanOrEqual(10);
    expect(withReport.named).toBeGreaterThanOrEqual(12);
  });
});

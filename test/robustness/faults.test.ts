/**
 * Faults on demand, each against a server of its own over a real socket
 * (the raw client): the fault fires where and when its spec says, logs one
 * warning, and leaves the device's real state alone (except ERROR, which a
 * failed arc may leave, as the spec allows). A server's fault-free twin
 * gives the reference where a stream is compared.
 */
import { readSync } from "node:fs";
import { afterEach, describe, expect, it } from "vitest";
import { Command, Errno, Feature, FeatureFlags, IrqIndex, IrqSetFlags, MigState, RegionIndex } from "../../protocol/index.ts";
import { EduDevice } from "../../devices/edu/edu.ts";
import { FaultSyntaxError } from "../../src/faults/language.ts";
import { VfioUserServer } from "../../src/server/server.ts";
import { native } from "../../src/transport/native.ts";
import { RawClient, eventfd, eventually, le, sleep, startInProcessServer, type InProcessServer, type LogLine } from "./raw-client.ts";

type Bench = InProcessServer & { c: RawClient };

const benches: Bench[] = [];
const fds: number[] = [];

afterEach(() => {
  for (const b of benches.splice(0)) {
    b.c.close();
    b.stop();
  }
  for (const fd of fds.splice(0)) native.close(fd);
});

async function open(faults: string[], opts: { conformance?: boolean } = {}): Promise<Bench> {
  const srv = startInProcessServer({ dirPrefix: "vfu-fault-", server: { faults, conformance: opts.conformance } });
  const b = { ...srv, c: await RawClient.ready(srv.socketPath) };
  benches.push(b);
  return b;
}

/** The "fault injected" warnings so far. */
function fired(b: Bench): LogLine[] {
  return b.logs.filter((l) => l.msg.startsWith("fault injected"));
}

const feature = (flags: number, data: Uint8Array = new Uint8Array(0), argsz?: number): Buffer =>
  le().u32(argsz ?? 8 + data.length + 64).u32(flags).bytes(data).buf;
const setStateBody = (state: number): Buffer => feature(Feature.MIG_DEVICE_STATE | FeatureFlags.SET, le().u32(state).s32(-1).buf);
const getState = feature(Feature.MIG_DEVICE_STATE | FeatureFlags.GET);
const dmaMap = (address: bigint): Buffer => le().u32(32).u32(3).u64(0).u64(address).u64(0x1000n).buf;
const read = (n: number): Buffer => le().u32(8 + n).u32(n).buf;

async function errnoOf(c: RawClient, command: number, body: Uint8Array): Promise<number> {
  return (await c.request(command, body)).header.error;
}

async function stateOf(c: RawClient): Promise<number> {
  const r = await c.request(Command.DEVICE_FEATURE, getState);
  expect(r.header.error).toBe(0);
  return r.body.readUInt32LE(8);
}

async function setState(c: RawClient, s: number): Promise<number> {
  return errnoOf(c, Command.DEVICE_FEATURE, setStateBody(s));
}

/** The whole STOP_COPY stream, read in `chunk`-byte requests until an empty reply. */
async function readStream(c: RawClient, chunk = 4096): Promise<{ bytes: Buffer; replies: number[] }> {
  const parts: Buffer[] = [];
  const replies: number[] = [];
  for (let i = 0; i < 10_000; i++) {
    const r = await c.request(Command.MIG_DATA_READ, read(chunk));
    expect(r.header.error).toBe(0);
    const n = r.body.readUInt32LE(4);
    replies.push(n);
    if (n === 0) return { bytes: Buffer.concat(parts), replies };
    parts.push(Buffer.from(r.body.subarray(8)));
  }
  throw new Error("stream did not end");
}

/** edu's liveness register holds ~value: something of the device's real state to check. */
async function setLiveness(c: RawClient, v: number): Promise<void> {
  await c.write(RegionIndex.BAR0, 0x4n, le().u32(v).buf);
}
async function liveness(c: RawClient): Promise<number> {
  return (await c.read(RegionIndex.BAR0, 0x4n, 4)).readUInt32LE(0);
}

describe("arc faults", () => {
  it("arc=PRE_COPY>STOP_COPY,errno=EIO: the request fails EIO, the device stays in PRE_COPY, the next try goes through", async () => {
    const b = await open(["arc=PRE_COPY>STOP_COPY,errno=EIO"]);
    await setLiveness(b.c, 0x1234);
    expect(await setState(b.c, MigState.PRE_COPY)).toBe(0);
    expect(await setState(b.c, MigState.STOP_COPY)).toBe(Errno.EIO);
    expect(await stateOf(b.c)).toBe(MigState.PRE_COPY);
    expect(fired(b)).toHaveLength(1);
    expect(fired(b)[0]).toMatchObject({ level: 40, fault: "arc=PRE_COPY>STOP_COPY,errno=EIO", nth: 1, from: "PRE_COPY", to: "STOP_COPY" });
    expect(await setState(b.c, MigState.STOP_COPY)).toBe(0);
    expect(await stateOf(b.c)).toBe(MigState.STOP_COPY);
    expect(await liveness(b.c)).toBe(~0x1234 >>> 0);
  });

  it("a refused hop in the middle of a walk: PRE_COPY -> STOP (via RUNNING) stops in RUNNING when RUNNING>STOP is refused", async () => {
    const b = await open(["arc=RUNNING>STOP,errno=EAGAIN"]);
    expect(await setState(b.c, MigState.PRE_COPY)).toBe(0);
    expect(await setState(b.c, MigState.STOP)).toBe(Errno.EAGAIN);
    expect(await stateOf(b.c)).toBe(MigState.RUNNING);
  });

  it("arc=STOP_COPY>STOP,error: the device enters ERROR with its registers as they were; DEVICE_RESET recovers", async () => {
    const b = await open(["arc=STOP_COPY>STOP,error"]);
    await setLiveness(b.c, 0x55);
    expect(await setState(b.c, MigState.STOP_COPY)).toBe(0);
    expect(await setState(b.c, MigState.STOP)).toBe(Errno.EIO);
    expect(await stateOf(b.c)).toBe(MigState.ERROR);
    expect(await liveness(b.c)).toBe(~0x55 >>> 0);
    expect(await setState(b.c, MigState.RUNNING)).toBe(Errno.EINVAL);
    expect(await errnoOf(b.c, Command.DEVICE_RESET, Buffer.alloc(0))).toBe(0);
    expect(await stateOf(b.c)).toBe(MigState.RUNNING);
    expect(fired(b)).toHaveLength(1);
  });

  it("arc=RUNNING>PRE_COPY,delay=300: the reply waits, later commands wait behind it in order, then PRE_COPY", async () => {
    const b = await open(["arc=RUNNING>PRE_COPY,delay=300"]);
    const t0 = performance.now();
    const stateId = b.c.send(Command.DEVICE_FEATURE, setStateBody(MigState.PRE_COPY));
    const readId = b.c.send(Command.REGION_READ, le().u64(0).u32(RegionIndex.CONFIG).u32(2).buf);
    const first = await Promise.race([b.c.reply(stateId).then(() => "state"), b.c.reply(readId, 10_000).then(() => "read")]);
    expect(first).toBe("state");
    expect(performance.now() - t0).toBeGreaterThanOrEqual(290);
    expect(await stateOf(b.c)).toBe(MigState.PRE_COPY);
    expect(fired(b).map((l) => l.msg)).toEqual(["fault injected: arc RUNNING>PRE_COPY held 300 ms"]);
  });

  it("nth and times: arc=STOP>RUNNING,errno=EIO,nth=2,times=2 fails the 2nd and 3rd time only", async () => {
    const b = await open(["arc=STOP>RUNNING,errno=EIO,nth=2,times=2"]);
    const results = [];
    for (let i = 0; i < 4; i++) {
      expect(await setState(b.c, MigState.STOP)).toBe(0);
      results.push(await setState(b.c, MigState.RUNNING));
    }
    expect(results).toEqual([0, Errno.EIO, Errno.EIO, 0]);
    expect(fired(b).map((l) => l.nth)).toEqual([2, 3]);
  });
});

describe("command faults", () => {
  it("cmd=DMA_MAP,nth=2,errno=ENOSPC: only the second DMA_MAP is refused, and maps nothing", async () => {
    const b = await open(["cmd=DMA_MAP,nth=2,errno=ENOSPC"]);
    const got = [];
    for (const a of [0x10000n, 0x20000n, 0x30000n]) got.push(await errnoOf(b.c, Command.DMA_MAP, dmaMap(a)));
    expect(got).toEqual([0, Errno.ENOSPC, 0]);
    expect(b.server.endpoint.dmaTable.regions().map((r) => r.iova)).toEqual([0x10000n, 0x30000n]);
    expect(fired(b)).toHaveLength(1);
  });

  it("feature=DMA_LOGGING_START,errno=ENOMEM: START refused (PROBE is not counted), logging off, the next START works", async () => {
    const b = await open(["feature=DMA_LOGGING_START,errno=ENOMEM"]);
    expect(await errnoOf(b.c, Command.DEVICE_FEATURE, feature(Feature.DMA_LOGGING_START | FeatureFlags.PROBE))).toBe(0);
    const start = feature(Feature.DMA_LOGGING_START | FeatureFlags.SET, le().u64(4096).u32(1).u32(0).u64(0x10000).u64(0x10000).buf);
    expect(await errnoOf(b.c, Command.DEVICE_FEATURE, start)).toBe(Errno.ENOMEM);
    expect(b.server.endpoint.dirtyLog).toBeNull();
    expect(await errnoOf(b.c, Command.DEVICE_FEATURE, start)).toBe(0);
    expect(b.server.endpoint.dirtyLog).not.toBeNull();
  });

  it("feature=DMA_LOGGING_REPORT,errno=EIO,in=PRE_COPY: only reports in PRE_COPY fail", async () => {
    const b = await open(["feature=DMA_LOGGING_REPORT,errno=EIO,in=PRE_COPY,times=all"]);
    const start = feature(Feature.DMA_LOGGING_START | FeatureFlags.SET, le().u64(4096).u32(1).u32(0).u64(0x10000).u64(0x10000).buf);
    expect(await errnoOf(b.c, Command.DEVICE_FEATURE, start)).toBe(0);
    const report = feature(Feature.DMA_LOGGING_REPORT | FeatureFlags.GET, le().u64(0x10000).u64(0x10000).u64(4096).buf, 8 + 24 + 8);
    expect(await errnoOf(b.c, Command.DEVICE_FEATURE, report)).toBe(0);
    expect(await setState(b.c, MigState.PRE_COPY)).toBe(0);
    expect(await errnoOf(b.c, Command.DEVICE_FEATURE, report)).toBe(Errno.EIO);
    expect(await errnoOf(b.c, Command.DEVICE_FEATURE, report)).toBe(Errno.EIO);
    expect(await setState(b.c, MigState.RUNNING)).toBe(0);
    expect(await errnoOf(b.c, Command.DEVICE_FEATURE, report)).toBe(0);
  });

  it("cmd=REGION_READ,delay=200,times=all: every read held, answered in order", async () => {
    const b = await open(["cmd=REGION_READ,delay=200,times=all"]);
    const t0 = performance.now();
    const ids = [0, 1, 2].map(() => b.c.send(Command.REGION_READ, le().u64(0).u32(RegionIndex.CONFIG).u32(2).buf));
    for (const id of ids) expect((await b.c.reply(id)).header.error).toBe(0);
    // in order, one after the other: three holds
    expect(performance.now() - t0).toBeGreaterThanOrEqual(590);
    expect(fired(b)).toHaveLength(3);
  });

  it("cmd=REGION_READ,nth=2,drop: the second read gets no reply; the connection closes", async () => {
    const b = await open(["cmd=REGION_READ,nth=2,drop"]);
    expect(await b.c.vendorId()).toBe(0x1234);
    const id = b.c.send(Command.REGION_READ, le().u64(0).u32(RegionIndex.CONFIG).u32(2).buf);
    await b.c.waitClosed();
    expect(b.c.hasReply(id)).toBe(false);
    // the server takes the next client as usual
    const again = await RawClient.ready(b.socketPath);
    expect(await again.vendorId()).toBe(0x1234);
    again.close();
  });

  it("after=3,drop: three messages served (VERSION counts), the fourth closes the connection", async () => {
    const b = await open(["after=3,drop"]);
    expect(await b.c.vendorId()).toBe(0x1234);
    expect(await b.c.vendorId()).toBe(0x1234);
    const id = b.c.send(Command.REGION_READ, le().u64(0).u32(RegionIndex.CONFIG).u32(2).buf);
    await b.c.waitClosed();
    expect(b.c.hasReply(id)).toBe(false);
    expect(fired(b).map((l) => l.msg)).toEqual(["fault injected: connection dropped instead of the reply"]);
  });

  it("state=STOP_COPY,drop: the device reaches STOP_COPY, the connection closes instead of the reply; the server puts the device back to RUNNING", async () => {
    const b = await open(["state=STOP_COPY,drop"]);
    await setLiveness(b.c, 0x77);
    expect(await setState(b.c, MigState.PRE_COPY)).toBe(0);
    const id = b.c.send(Command.DEVICE_FEATURE, setStateBody(MigState.STOP_COPY));
    await b.c.waitClosed();
    expect(b.c.hasReply(id)).toBe(false);
    expect(await eventually(() => b.logs.some((l) => l.msg.startsWith("client left mid-migration")), 5000)).toBe(true);
    const again = await RawClient.ready(b.socketPath);
    expect(await stateOf(again)).toBe(MigState.RUNNING);
    expect(await liveness(again)).toBe(~0x77 >>> 0);
    again.close();
  });
});

describe("stream and figure faults", () => {
  /** A device with some state, stopped: its STOP_COPY stream is what gets compared. */
  async function stopped(b: Bench): Promise<void> {
    await setLiveness(b.c, 0xabcd);
    await b.c.write(RegionIndex.BAR0, 0x8n, le().u32(6).buf);
    expect(await setState(b.c, MigState.STOP_COPY)).toBe(0);
  }

  it("cmd=MIG_DATA_READ,in=STOP_COPY,short=100: the first read returns 100 bytes, nothing is lost: the stream equals the fault-free one", async () => {
    const ref = await open([]);
    await stopped(ref);
    const want = await readStream(ref.c);
    const b = await open(["cmd=MIG_DATA_READ,in=STOP_COPY,short=100"]);
    await stopped(b);
    const got = await readStream(b.c);
    expect(got.replies[0]).toBe(100);
    expect(want.replies[0]).toBeGreaterThan(100);
    expect(got.bytes.equals(want.bytes)).toBe(true);
    expect(fired(b)).toHaveLength(1);
  });

  it("cmd=MIG_DATA_READ,in=STOP_COPY,corrupt=20: one bit of byte 20 differs; a destination refuses the stream; the source's own state is intact", async () => {
    const ref = await open([]);
    await stopped(ref);
    const want = await readStream(ref.c);
    const b = await open(["cmd=MIG_DATA_READ,in=STOP_COPY,corrupt=20"]);
    await stopped(b);
    const got = await readStream(b.c);
    expect(got.bytes.length).toBe(want.bytes.length);
    const diff = [...got.bytes].map((v, i) => v ^ want.bytes[i]!).flatMap((x, i) => (x !== 0 ? [[i, x]] : []));
    expect(diff).toEqual([[20, 1]]);
    expect(await liveness(b.c)).toBe(~0xabcd >>> 0);
    // a destination gets the corrupt stream: refused, at the latest when RESUMING ends
    const dst = await open([]);
    expect(await setState(dst.c, MigState.RESUMING)).toBe(0);
    const write = await errnoOf(dst.c, Command.MIG_DATA_WRITE, le().u32(8).u32(got.bytes.length).bytes(got.bytes).buf);
    const end = write === 0 ? await setState(dst.c, MigState.RUNNING) : write;
    expect(end).toBe(Errno.EINVAL);
  });

  it("feature=MIG_DATA_SIZE,size=1T: the first GET reports 2^40, the next the real size", async () => {
    const b = await open(["feature=MIG_DATA_SIZE,size=1T"]);
    const get = feature(Feature.MIG_DATA_SIZE | FeatureFlags.GET);
    const sizes = [];
    for (let i = 0; i < 2; i++) {
      const r = await b.c.request(Command.DEVICE_FEATURE, get);
      expect(r.header.error).toBe(0);
      sizes.push(r.body.readBigUInt64LE(8));
    }
    expect(sizes[0]).toBe(1n << 40n);
    expect(sizes[1]).toBeLessThan(1n << 20n);
    expect(sizes[1]).toBeGreaterThan(0n);
  });

  it("cmd=MIG_GET_PRECOPY_INFO,initial=1M,dirty=4K: reported once in PRE_COPY; the stream is not changed", async () => {
    const b = await open(["cmd=MIG_GET_PRECOPY_INFO,initial=1M,dirty=4K"]);
    expect(await setState(b.c, MigState.PRE_COPY)).toBe(0);
    const info = async () => {
      const r = await b.c.request(Command.MIG_GET_PRECOPY_INFO, le().u32(24).u32(0).buf);
      expect(r.header.error).toBe(0);
      return [r.body.readBigUInt64LE(8), r.body.readBigUInt64LE(16)];
    };
    expect(await info()).toEqual([1048576n, 4096n]);
    const real = await info();
    expect(real).not.toEqual([1048576n, 4096n]);
  });
});

describe("interrupt faults", () => {
  /** An eventfd on INTx and a loopback trigger of it (SET_IRQS DATA_NONE|TRIGGER): the signal goes through the controller. */
  async function intx(b: Bench): Promise<{ fd: number; trigger: () => Promise<void> }> {
    const fd = eventfd();
    fds.push(fd);
    const setFd = le().u32(24).u32(IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER).u32(IrqIndex.INTX).u32(0).u32(1).buf;
    expect((await b.c.request(Command.DEVICE_SET_IRQS, setFd, { fds: [fd] })).header.error).toBe(0);
    const trig = le().u32(20).u32(IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER).u32(IrqIndex.INTX).u32(0).u32(1).buf;
    return { fd, trigger: async () => expect((await b.c.request(Command.DEVICE_SET_IRQS, trig)).header.error).toBe(0) };
  }
  const count = (fd: number): number => {
    const buf = Buffer.alloc(8);
    try {
      readSync(fd, buf);
    } catch {
      return 0;
    }
    return Number(buf.readBigUInt64LE(0));
  };

  it("irq=INTX,stall=2000: the first interrupt arrives late, not lost; the second on time", async () => {
    const b = await open(["irq=INTX,stall=2000"]);
    const { fd, trigger } = await intx(b);
    await trigger();
    expect(count(fd)).toBe(0);
    expect(await eventually(() => count(fd) === 1, 15_000)).toBe(true);
    await trigger();
    expect(count(fd)).toBe(1);
    expect(fired(b).map((l) => l.msg)).toEqual(["fault injected: interrupt held 2000 ms"]);
  });

  it("irq=INTX,stall=forever: the first interrupt is lost, the second delivered", async () => {
    const b = await open(["irq=INTX,stall=forever"]);
    const { fd, trigger } = await intx(b);
    await trigger();
    await sleep(100);
    expect(count(fd)).toBe(0);
    await trigger();
    expect(count(fd)).toBe(1);
    expect(fired(b).map((l) => l.msg)).toEqual(["fault injected: interrupt lost"]);
  });
});

describe("faults and the conformance report", () => {
  it("an injected refusal is never a client deviation", async () => {
    const b = await open(["cmd=DMA_MAP,errno=EIO"], { conformance: true });
    expect(await errnoOf(b.c, Command.DMA_MAP, dmaMap(0x10000n))).toBe(Errno.EIO);
    expect(b.server.conformance!.report().clients[0]!.deviations).toEqual([]);
  });

  it("a spec that does not parse is refused when the server is made", () => {
    expect(() => new VfioUserServer({ device: new EduDevice(), faults: ["arc=STOP_COPY>PRE_COPY,errno=EIO"] })).toThrow(FaultSyntaxError);
  });
});


describe("faults compose", () => {
  it("in the order given: a delay, then a refusal of the same command", async () => {
    const b = await open(["cmd=REGION_READ,nth=2,delay=200", "cmd=REGION_READ,nth=2,errno=EBUSY"]);
    expect(await b.c.vendorId()).toBe(0x1234);
    const t0 = performance.now();
    expect(await errnoOf(b.c, Command.REGION_READ, le().u64(0).u32(RegionIndex.CONFIG).u32(2).buf)).toBe(Errno.EBUSY);
    expect(performance.now() - t0).toBeGreaterThanOrEqual(190);
    expect(fired(b).map((l) => l.msg)).toEqual(["fault injected: held 200 ms", "fault injected: refused with EBUSY"]);
  });
});

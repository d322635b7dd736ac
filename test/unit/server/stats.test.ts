/**
 * The server's own accounting (VfioUserServer.stats(), Connection's
 * decoderHighWater / sendQueueHighWater): exact numbers for known traffic
 * over an in-memory pair, where every send() arrives as one chunk, so what
 * the decoder holds is exactly the frames the test splits.
 */
import { afterEach, describe, expect, it } from "vitest";
import { BIGMEM_STATE_VERSION, BigmemDevice } from "../../../devices/bigmem/bigmem.ts";
import { EduDevice } from "../../../devices/edu/edu.ts";
import {
  Command,
  FrameDecoder,
  HEADER_SIZE,
  MigState,
  PROTOCOL_MAJOR,
  PROTOCOL_MINOR,
  RegionIndex,
  U32_MAX,
  commandHeader,
  encodeMessage,
  encodeRegionReadRequest,
  encodeVersion,
  type Frame,
} from "../../../protocol/index.ts";
import { VfioUserClient } from "../../../src/client/client.ts";
import { StateStreamWriter } from "../../../src/migration/state-stream.ts";
import { VfioUserServer } from "../../../src/server/server.ts";
import { createMemoryPair } from "../../../src/transport/in-memory.ts";
import type { Transport } from "../../../src/transport/types.ts";
import type { Device } from "../../../src/device/api.ts";

const servers: VfioUserServer[] = [];
afterEach(async () => {
  for (const s of servers.splice(0)) await s.close();
});

function server(device: Device = new EduDevice()): VfioUserServer {
  const s = new VfioUserServer({ device });
  servers.push(s);
  return s;
}

/** A client end that sends bytes exactly as split by the test and collects replies. */
class RawEnd {
  readonly replies: Frame[] = [];
  closed = false;
  private readonly decoder = new FrameDecoder({ maxFrameSize: U32_MAX, onFrame: (f) => this.replies.push({ ...f, body: Buffer.from(f.body) }) });

  constructor(readonly t: Transport) {
    t.start({ data: (chunk) => this.decoder.push(chunk), close: () => (this.closed = true) });
  }

  /** Sends `frame` in pieces cut at `cuts`, then waits for `replies` more replies. */
  async send(frame: Buffer, cuts: number[] = [], replies = 1): Promise<Frame[]> {
    const want = this.replies.length + replies;
    let at = 0;
    for (const cut of [...cuts, frame.length]) {
      this.t.send([frame.subarray(at, cut)]);
      at = cut;
    }
    for (let i = 0; i < 1000 && this.replies.length < want; i++) await new Promise((r) => setImmediate(r));
    if (this.replies.length < want) throw new Error(`no reply to command ${frame.readUInt16LE(2)}`);
    return this.replies.slice(want - replies);
  }
}

const frame = (msgId: number, command: number, body: Uint8Array): Buffer => Buffer.concat(encodeMessage(commandHeader(msgId, command), body));
const versionFrame = (): Buffer =>
  frame(1, Command.VERSION, encodeVersion({ major: PROTOCOL_MAJOR, minor: PROTOCOL_MINOR, data: JSON.stringify({ capabilities: { max_data_xfer_size: 1048576 } }) }));
const configRead = (msgId: number, count: number): Buffer => frame(msgId, Command.REGION_READ, encodeRegionReadRequest({ region: RegionIndex.CONFIG, offset: 0n, count }));

function connect(s: VfioUserServer): RawEnd {
  const [a, b] = createMemoryPair();
  s.accept(b);
  return new RawEnd(a);
}

async function closeAndWait(s: VfioUserServer, c: RawEnd): Promise<void> {
  c.t.close();
  for (let i = 0; i < 1000 && s.connection !== null; i++) await new Promise((r) => setImmediate(r));
  expect(s.connection).toBeNull();
}

describe("VfioUserServer.stats()", () => {
  it("a fresh server: all zero", () => {
    expect(server().stats()).toEqual({ decoderHighWater: 0, sendQueueHighWater: 0, resumeBufferHighWater: 0 });
  });

  it("decoderHighWater is the largest frame that arrived split; whole frames in one chunk count nothing", async () => {
    const s = server();
    const c = connect(s);
    await c.send(versionFrame());
    await c.send(configRead(2, 4));
    expect(s.stats().decoderHighWater).toBe(0);
    const split = configRead(3, 4);
    await c.send(split, [5]);
    expect(s.stats().decoderHighWater).toBe(split.length);
    expect(s.connection!.decoderHighWater).toBe(split.length);
  });

  it("sendQueueHighWater is the largest reply the client had not been handed yet (one request at a time)", async () => {
    const s = server();
    const c = connect(s);
    const [v] = await c.send(versionFrame());
    const [r64] = await c.send(configRead(2, 64));
    const [r4] = await c.send(configRead(3, 4));
    expect(r64!.header.size).toBe(HEADER_SIZE + 16 + 64);
    expect(s.stats().sendQueueHighWater).toBe(Math.max(v!.header.size, r64!.header.size, r4!.header.size));
    expect(s.connection!.sendQueueHighWater).toBe(s.stats().sendQueueHighWater);
  });

  it("two requests in one chunk: both replies queue before the client is handed either, so the mark is their sum", async () => {
    const s = server();
    const c = connect(s);
    await c.send(versionFrame());
    const replies = await c.send(Buffer.concat([configRead(2, 100), configRead(3, 200)]), [], 2);
    expect(s.stats().sendQueueHighWater).toBe(replies[0]!.header.size + replies[1]!.header.size);
  });

  it("keeps the maxima of closed connections: a later, quieter client does not lower them", async () => {
    const s = server();
    const a = connect(s);
    await a.send(versionFrame());
    const bigSplit = configRead(2, 256);
    const [big] = await a.send(bigSplit, [20]);
    await closeAndWait(s, a);
    const after = s.stats();
    expect(after.decoderHighWater).toBe(bigSplit.length);
    expect(after.sendQueueHighWater).toBe(big!.header.size);
    const b = connect(s);
    await b.send(versionFrame());
    await b.send(configRead(2, 2), [3]);
    expect(s.stats()).toEqual(after);
    await closeAndWait(s, b);
    expect(s.stats()).toEqual(after);
  });

  it("resumeBufferHighWater is the device's MigrationController.resumeBufferHighWater, kept after the client left", async () => {
    const dev = new BigmemDevice({ size: "1M" });
    const s = server(dev);
    const [a, b] = createMemoryPair();
    s.accept(b);
    const c = new VfioUserClient(a);
    await c.negotiate();
    await c.setMigState(MigState.STOP);
    await c.setMigState(MigState.RESUMING);
    const w = new StateStreamWriter();
    w.header({ deviceType: "bigmem", deviceVersion: BIGMEM_STATE_VERSION, configSize: 256 });
    w.memory(0n, Buffer.alloc(64 * 1024, 0x11));
    for (const seg of w.readSegments(1 << 30)) await c.migDataWrite(seg);
    const held = s.endpoint.migration.resumeBufferHighWater;
    expect(held).toBeGreaterThan(0);
    expect(s.stats().resumeBufferHighWater).toBe(held);
    c.close();
    for (let i = 0; i < 1000 && s.connection !== null; i++) await new Promise((r) => setImmediate(r));
    expect(s.connection).toBeNull();
    expect(s.stats().resumeBufferHighWater).toBe(held);
  });
});

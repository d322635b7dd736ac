/**
 * Frame-level faults close only the offending connection: the server goes
 * on, the next client connects and finds the device as it was left (a
 * register written before the fault reads back). Fds that came with the
 * offending bytes are closed. A reply-type frame nobody asked for is not a
 * fault: it is logged and dropped. One client at a time: a second
 * concurrent client is closed at once and the first one keeps working.
 *
 * The server is shared by the file; each case reads only the log lines
 * written since it began (a mark taken at its start), and the decoder
 * accounting of its own connection.
 */
import { afterAll, beforeAll, beforeEach, describe, expect, it } from "vitest";
import { Command, HEADER_SIZE, HeaderFlags, RegionIndex, encodeRegionReadRequest } from "../../protocol/index.ts";
import type { Connection } from "../../src/server/connection.ts";
import { native } from "../../src/transport/native.ts";
import {
  RawClient,
  eventually,
  fdTargets,
  frameBytes,
  le,
  memfd,
  sleep,
  startInProcessServer,
  versionBody,
  waitUntil,
  type InProcessServer,
  type LogLine,
} from "./raw-client.ts";

const VENDOR = 0x1234;
const DMA_SRC = 0x80n; // an edu register that reads back what was written
let srv: InProcessServer;
let serial = 0;
let marker = 0n;

beforeAll(() => {
  srv = startInProcessServer({ logLevel: "debug" });
});
afterAll(() => srv?.stop());

/** Leaves a fresh marker in the device before each fault. */
beforeEach(async () => {
  await waitNoClient();
  const c = await RawClient.ready(srv.socketPath);
  marker = 0x1000n + BigInt(++serial);
  await c.write(RegionIndex.BAR0, DMA_SRC, le().u64(marker).buf);
  c.close();
  await c.waitClosed();
  await waitNoClient();
});

/** Log lines written since `mark` (srv.logs.length at the start of a case). */
const logsSince = (mark: number): LogLine[] => srv.logs.slice(mark);

/** The server's side of the client that just connected (one client at a time). */
async function serverSide(): Promise<Connection> {
  await waitUntil(() => srv.server.connection !== null, "the server to accept the connection");
  return srv.server.connection!;
}

async function waitNoClient(): Promise<void> {
  expect(await eventually(() => srv.server.connection === null, 2000), "the previous client is gone").toBe(true);
}

/** After a fault: a new client works and the device kept its state. */
async function expectServerFine(): Promise<void> {
  await waitNoClient();
  const c = await RawClient.ready(srv.socketPath);
  try {
    expect(await c.vendorId()).toBe(VENDOR);
    expect((await c.read(RegionIndex.BAR0, DMA_SRC, 8)).readBigUInt64LE(0)).toBe(marker);
  } finally {
    c.close();
    await c.waitClosed();
  }
}

function memfdNamed(): { fd: number; name: string } {
  const name = `robust-frame-${process.pid}-${++serial}`;
  return { fd: memfd(name, 4096n), name };
}

function serverHolds(name: string): boolean {
  return fdTargets("self").some((t) => t.includes(`memfd:${name} `));
}

const header = (o: { msgId?: number; command: number; size: number; flags?: number; error?: number }): Buffer =>
  frameBytes({ msgId: o.msgId ?? 1, command: o.command, size: o.size, flags: o.flags ?? HeaderFlags.TYPE_COMMAND, error: o.error ?? 0 });

interface Fault {
  name: string;
  /** Before VERSION or after it. */
  afterVersion: boolean;
  bytes: Buffer;
  withFd?: boolean;
  /** A command in front of the fault that is answered before the close. */
  answered?: number;
}

const faults: Fault[] = [
  { name: "size 0", afterVersion: true, bytes: header({ command: Command.REGION_READ, size: 0 }) },
  { name: "size 15 (< header)", afterVersion: true, bytes: header({ command: Command.REGION_READ, size: 15 }) },
  { name: "size 8 before VERSION", afterVersion: false, bytes: header({ command: Command.VERSION, size: 8 }) },
  { name: "size 2^32-1", afterVersion: true, bytes: header({ command: Command.REGION_WRITE, size: 0xffffffff }) },
  { name: "size 2 GiB before VERSION (nothing allocated)", afterVersion: false, bytes: header({ command: Command.VERSION, size: 2 ** 31 }) },
  { name: "size above the negotiated maximum (4096 + 64 KiB)", afterVersion: true, bytes: header({ command: Command.REGION_WRITE, size: 16 + 65536 + 1 }) },
  // unknown commands are not frame faults: they get an errno and the session goes on (defects-commands.test.ts)
  { name: "size 15 of an unknown command (size is judged first)", afterVersion: true, bytes: header({ command: 0xffff, size: 15 }) },
  { name: "message type 2", afterVersion: true, bytes: header({ command: Command.REGION_READ, size: 32, flags: 2 }) },
  { name: "message type 15 with Error", afterVersion: true, bytes: header({ command: Command.REGION_READ, size: 16, flags: 0xf | HeaderFlags.ERROR }) },
  { name: "bad size with an fd on the same bytes (fd closed)", afterVersion: true, bytes: header({ command: Command.DMA_MAP, size: 4 }), withFd: true },
  {
    name: "a good command then garbage in the same chunk",
    afterVersion: true,
    bytes: Buffer.concat([frameBytes({ msgId: 0x77, command: Command.REGION_READ, flags: 0, error: 0 }, encodeRegionReadRequest({ region: RegionIndex.CONFIG, offset: 0n, count: 2 })), header({ command: 99, size: 3 })]),
    answered: 0x77,
  },
];

describe("frame-level faults close only the offending connection", () => {
  for (const f of faults) {
    it(`${f.name}: closed with one "bad frame" line, nothing of the frame buffered${f.withFd ? ", the fd closed" : ""}${f.answered !== undefined ? ", the command before it answered" : ""}; the next client finds the device as it was`, async () => {
      const mark = srv.logs.length;
      const c = f.afterVersion
        ? await RawClient.ready(srv.socketPath, { capabilities: { max_data_xfer_size: 4096 } })
        : RawClient.connect(srv.socketPath);
      const conn = await serverSide();
      const m = f.withFd ? memfdNamed() : null;
      const arrayBuffersBefore = process.memoryUsage().arrayBuffers;
      c.sendRaw(f.bytes, m ? [m.fd] : undefined);
      if (m) native.close(m.fd);
      await c.waitClosed(3000);
      if (f.answered !== undefined) expect(c.hasReply(f.answered)).toBe(true);
      // judged from the header alone: the decoder allocated nothing for the bad frame (whole frames in a chunk cost it nothing)
      expect(conn.decoderHighWater).toBe(0);
      expect(process.memoryUsage().arrayBuffers - arrayBuffersBefore).toBeLessThan(32 << 20);
      if (m) expect(serverHolds(m.name), "server kept the fd of the bad frame").toBe(false);
      expect(logsSince(mark).filter((l) => l.msg === "bad frame; closing the connection")).toHaveLength(1);
      await expectServerFine();
    });
  }

  it("a bad header split across two sends: open after the first part, closed after the rest with one \"bad frame\" line; the decoder held the 16 header bytes, no more", async () => {
    const mark = srv.logs.length;
    const c = await RawClient.ready(srv.socketPath);
    const conn = await serverSide();
    const bad = header({ command: 77, size: 5 });
    c.sendRaw(bad.subarray(0, 5));
    await sleep(20);
    expect(c.closed).toBe(false);
    c.sendRaw(bad.subarray(5));
    await c.waitClosed(3000);
    expect(conn.decoderHighWater).toBe(HEADER_SIZE);
    expect(logsSince(mark).filter((l) => l.msg === "bad frame; closing the connection")).toHaveLength(1);
    await expectServerFine();
  });

  it("truncated frame then EOF: the server drops the connection and goes on", async () => {
    const c = await RawClient.ready(srv.socketPath);
    const req = frameBytes({ msgId: 3, command: Command.REGION_WRITE, flags: 0, error: 0 }, le().u64(DMA_SRC).u32(0).u32(8).u64(0xdeadn).buf);
    c.sendRaw(req.subarray(0, req.length - 3)); // the last 3 data bytes never come
    await sleep(20);
    c.close();
    await expectServerFine(); // and the half-sent write was not applied
  });

  it("truncated header then EOF", async () => {
    const c = await RawClient.ready(srv.socketPath);
    c.sendRaw(Buffer.alloc(7));
    await sleep(20);
    c.close();
    await expectServerFine();
  });

  // Fds that arrive with the bytes of a frame that never completes wait in
  // the FrameDecoder; the connection closes them when the client goes or the
  // header turns out bad (they once leaked there).
  it("truncated frame carrying an fd, then EOF: the fd is closed", async () => {
    const c = await RawClient.ready(srv.socketPath);
    const m = memfdNamed();
    const req = frameBytes({ msgId: 3, command: Command.DMA_MAP, flags: 0, error: 0 }, le().u32(32).u32(3).u64(0).u64(0x100000).u64(4096).buf);
    c.sendRaw(req.subarray(0, 20), [m.fd]); // header + 4 bytes, with the fd
    native.close(m.fd);
    await sleep(20);
    c.close();
    await waitNoClient();
    const leaked = serverHolds(m.name);
    await expectServerFine();
    expect(leaked, "server still holds the fd of the truncated frame").toBe(false);
  });

  it("fds with a partial header, then a bad rest of the header: the fds are closed", async () => {
    const c = await RawClient.ready(srv.socketPath);
    const m = memfdNamed();
    const bad = header({ command: 77, size: 5 });
    c.sendRaw(bad.subarray(0, 6), [m.fd]);
    native.close(m.fd);
    await sleep(20);
    c.sendRaw(bad.subarray(6));
    await c.waitClosed(3000);
    await waitNoClient();
    const leaked = serverHolds(m.name);
    await expectServerFine();
    expect(leaked, "server still holds the fd sent with the partial header").toBe(false);
  });
});

describe("replies nobody asked for are dropped, not fatal", () => {
  it("a reply-type frame with an unknown msgId is logged and ignored; its fds are closed", async () => {
    const before = srv.logs.length;
    const c = await RawClient.ready(srv.socketPath);
    const m = memfdNamed();
    c.sendRaw(frameBytes({ msgId: 0x4242, command: Command.DMA_READ, flags: HeaderFlags.TYPE_REPLY, error: 0 }, le().u64(0).u64(4).u32(0).buf), [m.fd]);
    native.close(m.fd);
    c.sendRaw(frameBytes({ msgId: 0x4343, command: Command.REGION_READ, flags: HeaderFlags.TYPE_REPLY | HeaderFlags.ERROR, error: 5 }));
    c.sendRaw(frameBytes({ msgId: 0x4444, command: Command.DMA_WRITE, flags: HeaderFlags.TYPE_REPLY, error: 0 }, Buffer.alloc(60000)));
    expect(await c.vendorId()).toBe(VENDOR);
    expect(c.closed).toBe(false);
    expect(serverHolds(m.name)).toBe(false);
    const ignored = logsSince(before).filter((l) => l.msg === "reply to no request of ours; ignored");
    expect(ignored.map((l) => l.msgId)).toEqual([0x4242, 0x4343, 0x4444]);
    c.close();
    await c.waitClosed();
    await expectServerFine();
  });
});

describe("one client at a time", () => {
  it("a second concurrent client is closed at once (its fds too) with one \"refused\" line; eight more likewise; the first keeps working", async () => {
    const mark = srv.logs.length;
    const first = await RawClient.ready(srv.socketPath);
    const second = RawClient.connect(srv.socketPath);
    const m = memfdNamed();
    second.send(Command.VERSION, versionBody(), { fds: [m.fd] });
    native.close(m.fd);
    await second.waitClosed(3000);
    expect(second.pendingReplies).toBe(0);
    expect(await eventually(() => !serverHolds(m.name), 1000)).toBe(true);
    const refused = (): number => logsSince(mark).filter((l) => l.msg === "refused a second client: one client at a time").length;
    expect(refused()).toBe(1);
    expect(await first.vendorId()).toBe(VENDOR);
    // many at once
    const others = Array.from({ length: 8 }, () => RawClient.connect(srv.socketPath));
    await Promise.all(others.map((o) => o.waitClosed(3000)));
    expect(refused()).toBe(9);
    expect(await first.vendorId()).toBe(VENDOR);
    expect((await first.read(RegionIndex.BAR0, DMA_SRC, 8)).readBigUInt64LE(0)).toBe(marker);
    first.close();
    await first.waitClosed();
    await expectServerFine();
  });

  it("after the first client leaves, the next one is served", async () => {
    const a = await RawClient.ready(srv.socketPath);
    a.close();
    await a.waitClosed();
    await waitNoClient();
    const b = await RawClient.ready(srv.socketPath);
    expect(await b.vendorId()).toBe(VENDOR);
    b.close();
    await b.waitClosed();
  });
});

describe("a reply-sized read of config space still works after all of it", () => {
  it("REGION_READ of the whole config space", async () => {
    await waitNoClient();
    const c = await RawClient.ready(srv.socketPath);
    const r = await c.request(Command.REGION_READ, encodeRegionReadRequest({ region: RegionIndex.CONFIG, offset: 0n, count: 256 }));
    expect(r.header.error).toBe(0);
    expect(r.body.length).toBe(HEADER_SIZE + 256);
    c.close();
    await c.waitClosed();
  });
});

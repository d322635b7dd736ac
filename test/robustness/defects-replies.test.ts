/**
 * Replies that cannot be sent (issue 9, part 2, item 8) and the client's
 * max_msg_fds (item 10): a handler whose reply cannot go out (more fds than
 * one sendmsg carries, more fds than the client said it accepts in VERSION,
 * a transport that throws) is answered with EIO, logged as a reply failure,
 * and the session goes on. Before, the synchronous case closed the
 * connection as a "bad frame" and the asynchronous one crashed the process
 * through an unhandled rejection.
 *
 * The handlers here stand in for a device feature that returns fds (none of
 * the shipped handlers does today); they replace DEVICE_GET_REGION_IO_FDS,
 * whose reply is the one the spec gives fds.
 */
import fs from "node:fs";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { EduDevice } from "../../devices/edu/edu.ts";
import {
  Command,
  Errno,
  FrameDecoder,
  HEADER_SIZE,
  HeaderFlags,
  U32_MAX,
  commandHeader,
  encodeMessage,
  encodeVersion,
  type Frame,
} from "../../protocol/index.ts";
import { native } from "../../src/transport/native.ts";
import { UnixConnection } from "../../src/transport/unix-socket.ts";
import { VfioUserServer } from "../../src/server/server.ts";
import type { Reply, Request } from "../../src/server/dispatcher.ts";
import { captureLogger, eventfd, tmpDir, waitUntil, type LogLine } from "./raw-client.ts";

/** How many fds the stand-in handler returns, per request (set by each case). */
let replyFds = 0;
let asyncHandler = false;
let efd = -1;

function fdsHandler(_req: Request): Reply | Promise<Reply> {
  const reply: Reply = { parts: [Buffer.alloc(16)], fds: new Array<number>(replyFds).fill(efd) };
  return asyncHandler ? Promise.resolve(reply) : reply;
}

/** A client that records the fds each reply brought (then closes them). */
class FdClient {
  readonly replies = new Map<number, { frame: Frame; fds: number }>();
  private readonly decoder = new FrameDecoder({ maxFrameSize: U32_MAX, onFrame: (f) => this.onFrame(f) });
  private readonly conn: UnixConnection;
  private nextId = 1;
  closed = false;
  private wake: (() => void)[] = [];

  constructor(socketPath: string) {
    this.conn = UnixConnection.connect(socketPath);
    this.conn.start({
      data: (chunk, fds) => this.decoder.push(chunk, fds),
      close: () => {
        this.closed = true;
        this.poke();
      },
    });
  }

  private onFrame(f: Frame): void {
    for (const fd of f.fds) native.close(fd);
    this.replies.set(f.header.msgId, { frame: { ...f, body: Buffer.from(f.body) }, fds: f.fds.length });
    this.poke();
  }

  private poke(): void {
    const w = this.wake;
    this.wake = [];
    for (const f of w) f();
  }

  async request(command: number, body: Uint8Array = Buffer.alloc(0), timeoutMs = 5000): Promise<{ frame: Frame; fds: number }> {
    const id = this.nextId++;
    this.conn.send(encodeMessage(commandHeader(id, command), body));
    const deadline = Date.now() + timeoutMs;
    while (!this.replies.has(id)) {
      if (this.closed) throw new Error(`connection closed before the reply to ${id}`);
      if (Date.now() > deadline) throw new Error(`no reply to ${id} within ${timeoutMs} ms`);
      await new Promise<void>((r) => {
        this.wake.push(r);
        setTimeout(r, 50);
      });
    }
    const r = this.replies.get(id)!;
    this.replies.delete(id);
    return r;
  }

  async negotiate(maxMsgFds: number): Promise<void> {
    const v = await this.request(Command.VERSION, encodeVersion({ major: 0, minor: 0, data: JSON.stringify({ capabilities: { max_msg_fds: maxMsgFds } }) }));
    if (v.frame.header.error !== 0) throw new Error(`VERSION refused: ${v.frame.header.error}`);
  }

  async vendorId(): Promise<number> {
    const body = Buffer.alloc(16);
    body.writeUInt32LE(7, 8); // config space
    body.writeUInt32LE(2, 12);
    const r = await this.request(Command.REGION_READ, body);
    return r.frame.body.readUInt16LE(16);
  }

  close(): void {
    this.conn.close();
  }
}

let dir: string;
let socketPath: string;
let server: VfioUserServer;
const logs: LogLine[] = [];

beforeAll(() => {
  dir = tmpDir("vfu-replies-");
  socketPath = path.join(dir, "s.sock");
  efd = eventfd();
  server = new VfioUserServer({ device: new EduDevice(), log: captureLogger("info", logs), handlers: [[Command.DEVICE_GET_REGION_IO_FDS, fdsHandler]] });
  server.listen(socketPath);
});
afterAll(() => {
  server?.close();
  if (efd >= 0) native.close(efd);
  fs.rmSync(dir, { recursive: true, force: true });
});

async function session<T>(maxMsgFds: number, fn: (c: FdClient) => Promise<T>): Promise<T> {
  await waitUntil(() => server.connection === null, "the server to let go of the client");
  const c = new FdClient(socketPath);
  try {
    await c.negotiate(maxMsgFds);
    return await fn(c);
  } finally {
    c.close();
  }
}

const isError = (f: Frame) => (f.header.flags & HeaderFlags.ERROR) !== 0;

describe("the client's max_msg_fds bounds the fds of a reply", () => {
  it("max_msg_fds 2: a reply with 2 fds goes out with them", () =>
    session(2, async (c) => {
      replyFds = 2;
      asyncHandler = false;
      const r = await c.request(Command.DEVICE_GET_REGION_IO_FDS);
      expect(isError(r.frame)).toBe(false);
      expect(r.fds).toBe(2);
    }));

  it("max_msg_fds 1: a reply that would carry 2 fds is answered EIO, logged as a reply failure; the session goes on", () =>
    session(1, async (c) => {
      replyFds = 2;
      asyncHandler = false;
      const mark = logs.length;
      const r = await c.request(Command.DEVICE_GET_REGION_IO_FDS);
      expect(r.frame.header.error).toBe(Errno.EIO);
      expect(r.frame.header.size).toBe(HEADER_SIZE);
      expect(r.fds).toBe(0);
      const failed = logs.slice(mark).filter((l) => l.msg === "reply failed; answered EIO");
      expect(failed).toHaveLength(1);
      expect(failed[0]).toMatchObject({ cmd: "DEVICE_GET_REGION_IO_FDS", level: 50 });
      expect(String(failed[0]!.reason)).toMatch(/2 fds.*at most 1/);
      expect(await c.vendorId()).toBe(0x1234);
    }));

  it("no max_msg_fds in VERSION means 1 (spec default)", async () => {
    await waitUntil(() => server.connection === null, "the server to let go of the client");
    const c = new FdClient(socketPath);
    try {
      await c.request(Command.VERSION, encodeVersion({ major: 0, minor: 0, data: "" }));
      replyFds = 2;
      asyncHandler = false;
      expect((await c.request(Command.DEVICE_GET_REGION_IO_FDS)).frame.header.error).toBe(Errno.EIO);
      replyFds = 1;
      const r = await c.request(Command.DEVICE_GET_REGION_IO_FDS);
      expect(isError(r.frame)).toBe(false);
      expect(r.fds).toBe(1);
    } finally {
      c.close();
    }
  });
});

describe("a reply the transport cannot send: EIO, logged, keep serving", () => {
  for (const mode of ["synchronous", "asynchronous"] as const) {
    it(`${mode} handler, 300 fds (more than one sendmsg carries), the client takes 1000: EIO; the session goes on`, () =>
      session(1000, async (c) => {
        replyFds = 300;
        asyncHandler = mode === "asynchronous";
        const mark = logs.length;
        const r = await c.request(Command.DEVICE_GET_REGION_IO_FDS);
        expect(r.frame.header.error).toBe(Errno.EIO);
        expect(logs.slice(mark).filter((l) => l.msg === "reply failed; answered EIO")).toHaveLength(1);
        expect(logs.slice(mark).filter((l) => l.msg === "bad frame; closing the connection")).toHaveLength(0);
        expect(c.closed).toBe(false);
        expect(await c.vendorId()).toBe(0x1234);
      }));
  }
});

import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { native } from "../../../src/transport/native.ts";
import { mapFd } from "../../../src/transport/mapping.ts";
import { UnixConnection, UnixServer } from "../../../src/transport/unix-socket.ts";

/** What one side of a connection received. */
class Sink {
  chunks: Buffer[] = [];
  /** Fds with the total byte count at the end of the chunk that brought them. */
  fds: { fd: number; endOffset: number }[] = [];
  bytes = 0;
  closeCount = 0;
  closeErr: Error | undefined;
  private waiters: { pred: () => boolean; resolve: () => void }[] = [];

  constructor(readonly conn: UnixConnection) {
    conn.start({
      data: (chunk, fds) => {
        this.chunks.push(chunk);
        this.bytes += chunk.length;
        for (const fd of fds) this.fds.push({ fd, endOffset: this.bytes });
        this.poke();
      },
      close: (err) => {
        this.closeCount++;
        this.closeErr = err;
        this.poke();
      },
    });
  }

  data(): Buffer {
    return Buffer.concat(this.chunks);
  }

  until(pred: () => boolean, what = "condition"): Promise<void> {
    if (pred()) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), 10_000);
      this.waiters.push({
        pred,
        resolve: () => {
          clearTimeout(t);
          resolve();
        },
      });
    });
  }

  untilBytes(n: number): Promise<void> {
    return this.until(() => this.bytes >= n, `${n} bytes (have ${this.bytes})`);
  }

  untilClosed(): Promise<void> {
    return this.until(() => this.closeCount > 0, "close");
  }

  private poke(): void {
    this.waiters = this.waiters.filter((w) => {
      if (!w.pred()) return true;
      w.resolve();
      return false;
    });
  }
}

let dir: string;
const cleanups: (() => void)[] = [];

beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "vfio-transport-"));
});

afterEach(() => {
  for (const c of cleanups.splice(0)) {
    try {
      c();
    } catch {
      // best effort
    }
  }
  fs.rmSync(dir, { recursive: true, force: true });
});

/** A server plus one connected pair: [client side, server side]. */
async function connectedPair(): Promise<{ server: UnixServer; client: UnixConnection; accepted: UnixConnection; sockPath: string }> {
  const sockPath = path.join(dir, "s.sock");
  let accepted: UnixConnection | null = null;
  let resolveAccept!: () => void;
  const acceptedP = new Promise<void>((r) => (resolveAccept = r));
  const server = UnixServer.listen(sockPath, {
    onConnection: (c) => {
      accepted = c;
      resolveAccept();
    },
  });
  cleanups.push(() => server.close());
  const client = UnixConnection.connect(sockPath);
  cleanups.push(() => client.close());
  await acceptedP;
  cleanups.push(() => accepted!.close());
  return { server, client, accepted: accepted!, sockPath };
}

function pattern(n: number, seed: number): Buffer {
  const b = Buffer.allocUnsafe(n);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    b[i] = x & 0xff;
  }
  return b;
}

/** O_CLOEXEC (02000000 octal) in the fd's flags, from /proc. */
function isCloexec(fd: number): boolean {
  const flags = /flags:\s*([0-7]+)/.exec(fs.readFileSync(`/proc/self/fdinfo/${fd}`, "utf8"))![1]!;
  return (parseInt(flags, 8) & 0o2000000) !== 0;
}

function openFdCount(): number {
  return fs.readdirSync("/proc/self/fd").length;
}

describe("UnixConnection bytes", () => {
  it("sends and receives in both directions", async () => {
    const { client, accepted } = await connectedPair();
    const atServer = new Sink(accepted);
    const atClient = new Sink(client);
    client.send([Buffer.from("ping "), Buffer.from("from client")]);
    accepted.send([Buffer.from("pong from server")]);
    await atServer.untilBytes(16);
    await atClient.untilBytes(16);
    expect(atServer.data().toString()).toBe("ping from client");
    expect(atClient.data().toString()).toBe("pong from server");
    expect(client.peer).toBe(`unix:fd=${client.fd}`);
    expect(client.closed).toBe(false);
    expect(isCloexec(client.fd)).toBe(true);
    expect(isCloexec(accepted.fd)).toBe(true);
  });

  it("hands the receiver chunks it owns (not views of a reused buffer)", async () => {
    const { client, accepted } = await connectedPair();
    const sink = new Sink(accepted);
    client.send([Buffer.from("first")]);
    await sink.untilBytes(5);
    client.send([Buffer.from("SECOND")]);
    await sink.untilBytes(11);
    expect(sink.chunks[0]!.toString()).toBe("first");
    expect(sink.data().toString()).toBe("firstSECOND");
  });

  it("carries many messages sent back to back, in order", async () => {
    const { client, accepted } = await connectedPair();
    const sink = new Sink(accepted);
    const msgs: Buffer[] = [];
    for (let i = 0; i < 500; i++) {
      const body = pattern(1 + ((i * 7919) % 3000), i + 1);
      const hdr = Buffer.alloc(8);
      hdr.writeUInt32LE(i, 0);
      hdr.writeUInt32LE(body.length, 4);
      msgs.push(hdr, body);
      client.send([hdr, body]);
    }
    const expected = Buffer.concat(msgs);
    await sink.untilBytes(expected.length);
    expect(sink.data().equals(expected)).toBe(true);
  });

  it("delivers a 4 MiB message across partial writes and back-pressure", async () => {
    const { client, accepted } = await connectedPair();
    const big = pattern(4 << 20, 42);
    // Nobody reads yet: the socket fills and the rest must be queued.
    client.send([big.subarray(0, 1000), big.subarray(1000)]);
    expect((client as unknown as { queue: unknown[] }).queue.length).toBeGreaterThan(0);
    // The caller may reuse its buffers once send() returns.
    const tail = Buffer.from("tail-after-big");
    client.send([tail]);
    big.fill(0, 0, 1 << 20);
    const expected = Buffer.concat([pattern(4 << 20, 42), tail]);
    const sink = new Sink(accepted);
    await sink.untilBytes(expected.length);
    expect(sink.bytes).toBe(expected.length);
    expect(sink.data().equals(expected)).toBe(true);
    expect((client as unknown as { queue: unknown[] }).queue.length).toBe(0);
  });

  it("queuedBytes is what the socket did not take; queuedHighWater its most, kept after the queue drains", async () => {
    const { client, accepted } = await connectedPair();
    const queued = (): number => (client as unknown as { queue: { data: Buffer }[] }).queue.reduce((n, q) => n + q.data.length, 0);
    expect(client.queuedHighWater).toBe(0);
    client.send([pattern(4 << 20, 3)]);
    const first = client.queuedBytes;
    expect(first).toBeGreaterThan(0);
    expect(first).toBeLessThan(4 << 20);
    expect(first).toBe(queued());
    // with a queue, nothing goes to the socket directly: all 1000 bytes queue
    client.send([Buffer.alloc(1000)]);
    expect(client.queuedBytes).toBe(first + 1000);
    expect(client.queuedHighWater).toBe(first + 1000);
    const sink = new Sink(accepted);
    await sink.untilBytes((4 << 20) + 1000);
    expect(client.queuedBytes).toBe(0);
    expect(client.queuedHighWater).toBe(first + 1000);
    client.close();
    expect(client.queuedHighWater).toBe(first + 1000);
  });

  it("sends 4 MiB the other way while both sides also talk", async () => {
    const { client, accepted } = await connectedPair();
    const atClient = new Sink(client);
    const atServer = new Sink(accepted);
    const big = pattern(4 << 20, 7);
    accepted.send([big]);
    client.send([Buffer.from("hello")]);
    await atClient.untilBytes(big.length);
    await atServer.untilBytes(5);
    expect(atClient.data().equals(big)).toBe(true);
    expect(atServer.data().toString()).toBe("hello");
  });

  it("closes: the close handler fires once, deferred, and the peer sees EOF", async () => {
    const { client, accepted } = await connectedPair();
    const atClient = new Sink(client);
    const atServer = new Sink(accepted);
    client.send([Buffer.from("last words")]);
    client.close();
    expect(client.closed).toBe(true);
    expect(atClient.closeCount).toBe(0); // not synchronously inside close()
    client.close();
    client.send([Buffer.from("ignored")]); // no throw after close
    await atClient.untilClosed();
    await atServer.untilClosed();
    expect(atServer.data().toString()).toBe("last words");
    expect(atServer.closeErr).toBeUndefined();
    await new Promise((r) => setTimeout(r, 20));
    expect(atClient.closeCount).toBe(1);
    expect(atServer.closeCount).toBe(1);
    expect(accepted.closed).toBe(true);
  });

  it("reports a close that happened before start() once start() is called", async () => {
    const { client, accepted } = await connectedPair();
    client.close();
    accepted.close();
    let closes = 0;
    accepted.start({ data: () => {}, close: () => closes++ });
    expect(closes).toBe(0);
    await new Promise((r) => setTimeout(r, 20));
    expect(closes).toBe(1);
  });

  it("a peer that went away before start() is seen as EOF", async () => {
    const { client, accepted } = await connectedPair();
    client.send([Buffer.from("bye")]);
    client.close();
    const sink = new Sink(accepted);
    await sink.untilClosed();
    expect(sink.data().toString()).toBe("bye");
    expect(sink.closeErr).toBeUndefined();
  });

  it("a close() inside the data handler stops delivery", async () => {
    const { client, accepted } = await connectedPair();
    const got: string[] = [];
    let closes = 0;
    accepted.start({
      data: (chunk) => {
        got.push(chunk.toString());
        accepted.close();
      },
      close: () => closes++,
    });
    client.send([Buffer.from("one")]);
    await new Promise((r) => setTimeout(r, 50));
    client.send([Buffer.from("two")]);
    await new Promise((r) => setTimeout(r, 50));
    expect(got).toEqual(["one"]);
    expect(closes).toBe(1);
  });

  it("connect to a missing socket throws ENOENT, to a stale one ECONNREFUSED", () => {
    expect(() => UnixConnection.connect(path.join(dir, "nope.sock"))).toThrow(expect.objectContaining({ code: "ENOENT" }));
    const stale = path.join(dir, "stale.sock");
    const fd = native.listen(stale, 1);
    expect(fd).toBeGreaterThanOrEqual(0);
    native.close(fd);
    expect(() => UnixConnection.connect(stale)).toThrow(expect.objectContaining({ code: "ECONNREFUSED" }));
  });
});

describe("fd passing", () => {
  it("passes a memfd that the receiver maps and reads", async () => {
    const { client, accepted } = await connectedPair();
    const sink = new Sink(accepted);
    const content = pattern(8192, 3);
    const mfd = native.memfdCreate("guest-ram", 8192n);
    expect(mfd).toBeGreaterThanOrEqual(0);
    fs.writeSync(mfd, content, 0, content.length, 0);
    client.send([Buffer.from("DMA_MAP-header..")], [mfd]);
    native.close(mfd); // the peer has its own copy now
    await sink.untilBytes(16);
    expect(sink.fds.length).toBe(1);
    const rfd = sink.fds[0]!.fd;
    expect(native.fstatSize(rfd)).toBe(8192n);
    expect(isCloexec(rfd)).toBe(true); // MSG_CMSG_CLOEXEC
    const m = mapFd(rfd, 0n, 8192n, true);
    expect(m.read(0n, 8192).equals(content)).toBe(true);
    native.close(rfd);
    m.unmap();
  });

  it("passes an eventfd: written on one side, readable on the other", async () => {
    const { client, accepted } = await connectedPair();
    const sink = new Sink(accepted);
    const efd = native.eventfd(0, 0);
    expect(efd).toBeGreaterThanOrEqual(0);
    client.send([Buffer.from("SET_IRQS")], [efd]);
    await sink.untilBytes(8);
    const rfd = sink.fds[0]!.fd;
    const one = Buffer.alloc(8);
    one.writeBigUInt64LE(1n);
    fs.writeSync(efd, one);
    fs.writeSync(efd, one);
    const got = Buffer.alloc(8);
    expect(fs.readSync(rfd, got, 0, 8, null)).toBe(8);
    expect(got.readBigUInt64LE()).toBe(2n);
    native.close(efd);
    native.close(rfd);
  });

  it("fds of a queued message are kept (dup'ed) and arrive with that message", async () => {
    const { client, accepted } = await connectedPair();
    const big = pattern(2 << 20, 9);
    client.send([big]); // fills the socket: the next message is queued
    const mfd = native.memfdCreate("late", 4096n);
    fs.writeSync(mfd, Buffer.from("queued fd content"), 0, 17, 0);
    const second = Buffer.from("second message with an fd");
    client.send([second], [mfd]);
    expect((client as unknown as { queue: unknown[] }).queue.length).toBeGreaterThan(0);
    native.close(mfd); // the caller may close its fd at once
    client.send([Buffer.from("third")]);
    const sink = new Sink(accepted);
    const total = big.length + second.length + 5;
    await sink.untilBytes(total);
    expect(sink.fds.length).toBe(1);
    // the fd came with the read that ended inside the second message
    const end = sink.fds[0]!.endOffset;
    expect(end).toBeGreaterThan(big.length);
    expect(end).toBeLessThanOrEqual(big.length + second.length);
    const m = mapFd(sink.fds[0]!.fd, 0n, 4096n, false);
    expect(m.read(0n, 17).toString()).toBe("queued fd content");
    m.unmap();
    native.close(sink.fds[0]!.fd);
    expect(sink.data().equals(Buffer.concat([big, second, Buffer.from("third")]))).toBe(true);
  });

  it("closes fds of messages still queued when the connection closes", async () => {
    const { client } = await connectedPair();
    const before = openFdCount();
    client.send([pattern(4 << 20, 1)]);
    const efd = native.eventfd(0, 0);
    client.send([Buffer.from("x")], [efd]);
    native.close(efd);
    expect(openFdCount()).toBe(before + 1); // the queued dup
    client.close();
    expect(openFdCount()).toBe(before - 1); // dup and the socket gone
  });
});

describe("UnixServer", () => {
  it("creates the socket with mode 0600 by default, or the given mode", () => {
    const a = path.join(dir, "a.sock");
    const b = path.join(dir, "b.sock");
    const s1 = UnixServer.listen(a, { onConnection: () => {} });
    const s2 = UnixServer.listen(b, { mode: 0o660, onConnection: () => {} });
    cleanups.push(() => s1.close(), () => s2.close());
    expect(fs.statSync(a).isSocket()).toBe(true);
    expect(fs.statSync(a).mode & 0o777).toBe(0o600);
    expect(fs.statSync(b).mode & 0o777).toBe(0o660);
  });

  it("replaces a stale socket file", async () => {
    const p = path.join(dir, "stale.sock");
    const fd = native.listen(p, 1);
    native.close(fd); // the file stays, nobody listens
    expect(fs.statSync(p).isSocket()).toBe(true);
    let got: UnixConnection | null = null;
    const server = UnixServer.listen(p, { onConnection: (c) => (got = c) });
    cleanups.push(() => server.close());
    const c = UnixConnection.connect(p);
    cleanups.push(() => c.close());
    const deadline = Date.now() + 5000;
    while (got === null && Date.now() < deadline) await new Promise((r) => setTimeout(r, 5));
    expect(got).not.toBeNull();
    (got as unknown as UnixConnection).close();
  });

  it("refuses a path where a live server listens (EADDRINUSE) and leaves it working", async () => {
    const p = path.join(dir, "live.sock");
    // The liveness probe is a real connection that closes at once; the
    // live server must keep working for real clients afterwards.
    const first = UnixServer.listen(p, {
      onConnection: (c) => {
        cleanups.push(() => c.close());
        c.start({ data: (chunk) => c.send([chunk]), close: () => {} });
      },
    });
    cleanups.push(() => first.close());
    expect(() => UnixServer.listen(p, { onConnection: () => {} })).toThrow(
      expect.objectContaining({ code: "EADDRINUSE", message: expect.stringMatching(/already|listening/) }),
    );
    expect(fs.statSync(p).isSocket()).toBe(true);
    const c = UnixConnection.connect(p);
    cleanups.push(() => c.close());
    const sink = new Sink(c);
    c.send([Buffer.from("still alive?")]);
    await sink.untilBytes(12);
    expect(sink.data().toString()).toBe("still alive?");
  });

  it("does not remove a regular file at the path", () => {
    const p = path.join(dir, "file.sock");
    fs.writeFileSync(p, "not a socket");
    expect(() => UnixServer.listen(p, { onConnection: () => {} })).toThrow(
      expect.objectContaining({ code: "EADDRINUSE", message: expect.stringContaining("not a socket") }),
    );
    expect(fs.readFileSync(p, "utf8")).toBe("not a socket");
  });

  it("explains a missing directory", () => {
    const p = path.join(dir, "no", "such", "dir", "s.sock");
    expect(() => UnixServer.listen(p, { onConnection: () => {} })).toThrow(
      expect.objectContaining({ code: "ENOENT", message: expect.stringContaining("does not exist") }),
    );
  });

  it("close() unlinks its own socket file but not a newer one at the same path", () => {
    const p = path.join(dir, "mine.sock");
    const a = UnixServer.listen(p, { onConnection: () => {} });
    a.close();
    expect(fs.existsSync(p)).toBe(false);

    const b = UnixServer.listen(p, { onConnection: () => {} });
    fs.unlinkSync(p);
    const c = UnixServer.listen(p, { onConnection: () => {} });
    cleanups.push(() => c.close());
    b.close();
    expect(fs.statSync(p).isSocket()).toBe(true); // c's file survived
    c.close();
    expect(fs.existsSync(p)).toBe(false);
  });

  it("accepts several clients", async () => {
    const p = path.join(dir, "multi.sock");
    const conns: UnixConnection[] = [];
    const server = UnixServer.listen(p, { onConnection: (c) => conns.push(c) });
    cleanups.push(() => server.close());
    const clients = [0, 1, 2].map(() => UnixConnection.connect(p));
    for (const c of clients) cleanups.push(() => c.close());
    const deadline = Date.now() + 5000;
    while (conns.length < 3 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 5));
    expect(conns.length).toBe(3);
    for (const c of conns) c.close();
  });
});

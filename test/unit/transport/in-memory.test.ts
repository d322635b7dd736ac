import { describe, expect, it } from "vitest";
import { createMemoryPair } from "../../../src/transport/in-memory.ts";
import type { Transport } from "../../../src/transport/types.ts";

interface Recorder {
  events: (string | { data: string; fds: number[] })[];
  closed: Promise<void>;
}

function record(t: Transport): Recorder {
  const events: Recorder["events"] = [];
  let resolve!: () => void;
  const closed = new Promise<void>((r) => (resolve = r));
  t.start({
    data: (chunk, fds) => events.push({ data: chunk.toString(), fds }),
    close: (err) => {
      events.push(err ? `close:${err.message}` : "close");
      resolve();
    },
  });
  return { events, closed };
}

const tick = () => new Promise((r) => setImmediate(r));

describe("createMemoryPair", () => {
  it("delivers asynchronously, in order, with fds passed through", async () => {
    const [a, b] = createMemoryPair();
    const rb = record(b);
    const ra = record(a);
    a.send([Buffer.from("one")]);
    a.send([Buffer.from("tw"), Buffer.from("o")], [7, 8]);
    a.send([Buffer.from("three")]);
    b.send([Buffer.from("back")]);
    expect(rb.events).toEqual([]); // not synchronous
    await tick();
    await tick();
    expect(rb.events).toEqual([
      { data: "one", fds: [] },
      { data: "two", fds: [7, 8] },
      { data: "three", fds: [] },
    ]);
    expect(ra.events).toEqual([{ data: "back", fds: [] }]);
  });

  it("gives the receiver its own copy of the bytes", async () => {
    const [a, b] = createMemoryPair();
    const got: Buffer[] = [];
    b.start({ data: (c) => got.push(c), close: () => {} });
    const buf = Buffer.from("original");
    a.send([buf]);
    buf.write("CHANGED!");
    await tick();
    expect(got[0]!.toString()).toBe("original");
  });

  it("holds data sent before start()", async () => {
    const [a, b] = createMemoryPair();
    a.send([Buffer.from("early")]);
    await tick();
    const rb = record(b);
    await tick();
    expect(rb.events).toEqual([{ data: "early", fds: [] }]);
  });

  it("closing one end closes both, after data already sent, each handler once", async () => {
    const [a, b] = createMemoryPair();
    const ra = record(a);
    const rb = record(b);
    a.send([Buffer.from("before close")]);
    a.close();
    expect(a.closed).toBe(true);
    expect(b.closed).toBe(true);
    expect(ra.events).toEqual([]); // deferred
    a.close();
    a.send([Buffer.from("dropped")]);
    b.send([Buffer.from("dropped")]);
    await Promise.all([ra.closed, rb.closed]);
    await tick();
    await tick();
    expect(rb.events).toEqual([{ data: "before close", fds: [] }, "close"]);
    expect(ra.events).toEqual(["close"]);
  });

  it("a close() on the side whose peer closed first fires its handler once", async () => {
    const [a, b] = createMemoryPair();
    const rb = record(b);
    a.close();
    b.close();
    b.close();
    await rb.closed;
    await tick();
    await tick();
    expect(rb.events).toEqual(["close"]);
  });

  it("delivers nothing to a side after its own close()", async () => {
    const [a, b] = createMemoryPair();
    const ra = record(a);
    b.send([Buffer.from("in flight")]);
    a.close();
    await ra.closed;
    expect(ra.events).toEqual(["close"]);
  });

  it("reports close to a side that starts after the peer closed", async () => {
    const [a, b] = createMemoryPair();
    a.send([Buffer.from("x")]);
    a.close();
    await tick();
    const rb = record(b);
    await rb.closed;
    expect(rb.events).toEqual([{ data: "x", fds: [] }, "close"]);
  });
});

describe("createMemoryPair: queuedBytes / queuedHighWater", () => {
  it("count what one side sent and the other was not handed yet; the high-water mark stays", async () => {
    const [a, b] = createMemoryPair();
    a.send([Buffer.from("abc")]);
    a.send([Buffer.from("de"), Buffer.from("fgh")]);
    expect(a.queuedBytes).toBe(8);
    expect(a.queuedHighWater).toBe(8);
    expect(b.queuedBytes).toBe(0);
    const rb = record(b);
    record(a);
    await tick();
    expect(rb.events).toEqual([{ data: "abc", fds: [] }, { data: "defgh", fds: [] }]);
    expect(a.queuedBytes).toBe(0);
    expect(a.queuedHighWater).toBe(8);
    a.send([Buffer.alloc(5)]);
    expect(a.queuedBytes).toBe(5);
    await tick();
    expect(a.queuedBytes).toBe(0);
    expect(a.queuedHighWater).toBe(8);
  });

  it("what the receiver drops by closing leaves the sender's count too", async () => {
    const [a, b] = createMemoryPair();
    record(a);
    record(b);
    a.send([Buffer.alloc(100)]);
    b.close();
    expect(a.queuedBytes).toBe(0);
    expect(a.queuedHighWater).toBe(100);
  });
});

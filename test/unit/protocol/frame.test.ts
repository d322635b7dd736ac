import { describe, expect, it } from "vitest";
import {
  Command,
  FrameDecoder,
  FrameError,
  HEADER_SIZE,
  commandHeader,
  encodeDmaMapRequest,
  encodeDmaReadReply,
  encodeMessage,
  encodeRegionReadReply,
  encodeRegionWriteRequest,
  encodeReply,
  encodeVersion,
  maxFrameSizeFor,
  type Frame,
  type Header,
} from "../../../protocol/index.ts";
import { prng, randInt, toHex } from "./helpers.ts";

/** A stream of varied frames: commands, replies, empty bodies, a body larger than typical chunks. */
function buildStream(): { bytes: Buffer; frames: { header: Header; body: string }[] } {
  const msgs: Buffer[][] = [
    encodeMessage(commandHeader(1, Command.VERSION), encodeVersion({ major: 0, minor: 0, data: '{"capabilities":{}}' })),
    encodeMessage(commandHeader(2, Command.DMA_MAP), encodeDmaMapRequest({ argsz: 32, flags: 3, offset: 0n, address: 0x1000n, size: 0x1000n })),
    encodeMessage(commandHeader(3, Command.DEVICE_RESET)),
    encodeMessage(
      commandHeader(4, Command.REGION_WRITE, true),
      encodeRegionWriteRequest({ offset: 8n, region: 0, count: 4, data: Buffer.from([1, 2, 3, 4]) }),
    ),
    encodeReply({ msgId: 900, command: Command.DMA_READ }, encodeDmaReadReply({ address: 0x2000n, count: 40n, data: Buffer.alloc(40, 0x7e) })),
    encodeMessage(commandHeader(5, Command.DEVICE_RESET)),
    encodeReply(
      { msgId: 6, command: Command.REGION_READ },
      encodeRegionReadReply({ offset: 0n, region: 1, count: 700, data: Buffer.from(Array.from({ length: 700 }, (_, i) => i & 0xff)) }),
    ),
    encodeMessage(commandHeader(7, Command.MIG_GET_PRECOPY_INFO), Buffer.from([24, 0, 0, 0, 0, 0, 0, 0])),
  ];
  const flat = msgs.map((parts) => Buffer.concat(parts));
  return {
    bytes: Buffer.concat(flat),
    frames: flat.map((f) => ({
      header: {
        msgId: f.readUInt16LE(0),
        command: f.readUInt16LE(2),
        size: f.readUInt32LE(4),
        flags: f.readUInt32LE(8),
        error: f.readUInt32LE(12),
      },
      body: toHex(f.subarray(HEADER_SIZE)),
    })),
  };
}

const stream = buildStream();

/** Start offsets of the frames in the stream, plus the end. */
const boundaries = (() => {
  const out = [0];
  for (const f of stream.frames) out.push(out[out.length - 1] + f.header.size);
  return out;
})();

/** Index of the frame holding stream byte `pos`. */
function frameAt(pos: number): number {
  for (let i = 0; i < stream.frames.length; i++) if (pos < boundaries[i + 1]) return i;
  throw new Error("past the end");
}

/**
 * Feeds the stream cut at `cuts`, chunk k carrying fd 1000 + k, and checks
 * frames and the fd rule: a chunk's fds go to the frame holding its last byte.
 */
function feed(cuts: number[]): void {
  const got: Frame[] = [];
  const dec = new FrameDecoder({ onFrame: (f) => got.push({ ...f, body: Buffer.from(f.body) }) });
  const edges = [0, ...cuts, stream.bytes.length];
  const expectedFds: number[][] = stream.frames.map(() => []);
  for (let k = 0; k + 1 < edges.length; k++) {
    const chunk = stream.bytes.subarray(edges[k], edges[k + 1]);
    const fds = chunk.length > 0 ? [1000 + k] : [];
    if (chunk.length > 0) expectedFds[frameAt(edges[k + 1] - 1)].push(1000 + k);
    dec.push(chunk, fds);
  }
  expect(got.map((f) => ({ header: f.header, body: toHex(f.body) }))).toEqual(stream.frames);
  expect(got.map((f) => f.fds)).toEqual(expectedFds);
  expect(dec.bufferedBytes).toBe(0);
  expect(dec.close()).toEqual([]);
}

describe("FrameDecoder: chaotic chunking", () => {
  it("yields the same frames when the stream arrives whole", () => {
    feed([]);
  });

  it("yields the same frames and fd owners for a split at every byte offset", () => {
    for (let i = 1; i < stream.bytes.length; i++) feed([i]);
  });

  it("yields the same frames for every one-byte chunking", () => {
    feed(Array.from({ length: stream.bytes.length - 1 }, (_, i) => i + 1));
  });

  it("yields the same frames for random chunkings (seeded)", () => {
    const rand = prng(0x5eed);
    for (let round = 0; round < 500; round++) {
      const n = 1 + randInt(rand, 12);
      const cuts = new Set<number>();
      for (let j = 0; j < n; j++) cuts.add(1 + randInt(rand, stream.bytes.length - 1));
      feed([...cuts].sort((a, b) => a - b));
    }
  });

  it("attaches fds of an empty chunk to the frame in progress", () => {
    const got: Frame[] = [];
    const dec = new FrameDecoder({ onFrame: (f) => got.push(f) });
    const first = stream.bytes.subarray(0, stream.frames[0].header.size + 3);
    dec.push(first, [5]);
    dec.push(Buffer.alloc(0), [6]);
    dec.push(stream.bytes.subarray(first.length, boundaries[2]), [7]);
    expect(got.map((f) => f.fds)).toEqual([[], [5, 6, 7]]);
  });

  it("delivers frames inside a chunk as views of it, assembles split ones", () => {
    const got: Frame[] = [];
    const dec = new FrameDecoder({ onFrame: (f) => got.push(f) });
    const cut = boundaries[1] + 10; // frame 1 split
    const a = Buffer.from(stream.bytes.subarray(0, cut));
    const b = Buffer.from(stream.bytes.subarray(cut));
    dec.push(a);
    dec.push(b);
    // small Buffers share Node's pool, so probe aliasing by writing through the chunks
    const before = got.map((f) => Buffer.from(f.body));
    a.fill(0xaa);
    b.fill(0xbb);
    expect(got[0].body.every((x) => x === 0xaa)).toBe(true); // view of a
    expect(Buffer.compare(got[1].body, before[1])).toBe(0); // own buffer
    expect(got[2].body.every((x) => x === 0xbb)).toBe(true); // view of b
  });

  it("accepts a plain Uint8Array chunk", () => {
    const got: Frame[] = [];
    const dec = new FrameDecoder({ onFrame: (f) => got.push(f) });
    dec.push(new Uint8Array(stream.bytes));
    expect(got).toHaveLength(stream.frames.length);
  });
});

function header(size: number, command: number, flags = 0): Buffer {
  const b = Buffer.alloc(HEADER_SIZE);
  b.writeUInt16LE(1, 0);
  b.writeUInt16LE(command, 2);
  b.writeUInt32LE(size, 4);
  b.writeUInt32LE(flags, 8);
  return b;
}

describe("FrameDecoder: bad headers throw FrameError from the 16 header bytes alone", () => {
  it.each<[string, Buffer]>([
    ["size below 16", header(15, Command.DEVICE_RESET)],
    ["size 0", header(0, Command.DEVICE_RESET)],
    ["size above the limit", header(maxFrameSizeFor(1048576) + 1, Command.REGION_WRITE)],
    ["size 2^32-1", header(0xffff_ffff, Command.REGION_WRITE)],
    ["size 15 of an unknown command", header(15, 0xffff)],
    ["type 2", header(16, Command.DEVICE_RESET, 2)],
    ["type 15", header(16, Command.DEVICE_RESET, 0xf)],
  ])("%s", (_what, hdr) => {
    // whole header in one chunk, no body
    const dec = new FrameDecoder({ onFrame: () => expect.unreachable() });
    expect(() => dec.push(hdr, [3])).toThrow(FrameError);
    expect(dec.closed).toBe(true);
    expect(dec.close()).toEqual([3]);

    // header trickling in: the 16th byte triggers the error
    const dec2 = new FrameDecoder({ onFrame: () => expect.unreachable() });
    for (let i = 0; i < HEADER_SIZE - 1; i++) dec2.push(hdr.subarray(i, i + 1));
    expect(() => dec2.push(hdr.subarray(HEADER_SIZE - 1))).toThrow(FrameError);
  });

  it("delivers a frame of an unknown command (0, 14, 20, 0xffff): the receiver answers it, the stream keeps its framing", () => {
    for (const command of [0, 14, 20, 0xffff]) {
      const got: Frame[] = [];
      const dec = new FrameDecoder({ onFrame: (f) => got.push(f) });
      const unknown = Buffer.concat([header(20, command), Buffer.from([1, 2, 3, 4])]);
      dec.push(Buffer.concat([unknown, stream.bytes.subarray(0, boundaries[1])]), [7]);
      expect(got.map((f) => f.header.command)).toEqual([command, Command.VERSION]);
      expect(got[0]!.body).toEqual(Buffer.from([1, 2, 3, 4]));
      expect(dec.closed).toBe(false);
    }
  });

  it("throws after delivering the good frames before the bad one, keeps the fds", () => {
    const got: Frame[] = [];
    const dec = new FrameDecoder({ onFrame: (f) => got.push(f) });
    const bad = header(8, 99);
    let err: unknown;
    try {
      dec.push(Buffer.concat([stream.bytes.subarray(0, boundaries[2]), bad]), [11]);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(FrameError);
    expect((err as FrameError).header?.command).toBe(99);
    expect(got).toHaveLength(2);
    expect(() => dec.push(stream.bytes, [12])).toThrow(FrameError);
    expect(dec.close()).toEqual([11, 12]);
  });

  it("refuses a frame of maxFrameSize + 1 but takes one of maxFrameSize", () => {
    const got: Frame[] = [];
    const dec = new FrameDecoder({ onFrame: (f) => got.push(f), maxFrameSize: 64 });
    const ok = Buffer.concat([header(64, Command.REGION_WRITE), Buffer.alloc(48)]);
    dec.push(ok);
    expect(got).toHaveLength(1);
    expect(() => dec.push(header(65, Command.REGION_WRITE))).toThrow(FrameError);
  });

  it("applies a limit changed after negotiation to the next header", () => {
    const dec = new FrameDecoder({ onFrame: () => {} });
    dec.push(header(4096, Command.REGION_WRITE));
    dec.push(Buffer.alloc(4096 - HEADER_SIZE));
    dec.maxFrameSize = 1024;
    expect(dec.maxFrameSize).toBe(1024);
    expect(() => dec.push(header(4096, Command.REGION_WRITE))).toThrow(FrameError);
    expect(() => (new FrameDecoder({ onFrame: () => {} }).maxFrameSize = 15)).toThrow(RangeError);
  });

  it("closes when onFrame throws, keeping undelivered fds", () => {
    const dec = new FrameDecoder({
      onFrame: () => {
        throw new Error("handler bug");
      },
    });
    expect(() => dec.push(stream.bytes, [21])).toThrow("handler bug");
    expect(dec.closed).toBe(true);
    expect(dec.close()).toEqual([21]);
  });
});

describe("maxFrameSizeFor", () => {
  it("is header + 16-byte fixed part + data, with a floor for control messages", () => {
    expect(maxFrameSizeFor(1048576)).toBe(16 + 16 + 1048576);
    expect(maxFrameSizeFor(64 * 1024 * 1024)).toBe(16 + 16 + 64 * 1024 * 1024);
    // small transfer limits still leave room for VERSION JSON, WRITE_MULTI (4808 bytes) and the like
    expect(maxFrameSizeFor(0)).toBe(16 + 64 * 1024);
    expect(maxFrameSizeFor(0xffff_ffff)).toBe(0xffff_ffff);
    expect(() => maxFrameSizeFor(-1)).toThrow(RangeError);
  });
});

describe("FrameDecoder.highWater: the most it held at once for an incomplete frame", () => {
  /** One command frame of exactly `size` bytes (body zeros). */
  const frameOf = (size: number, msgId = 1): Buffer => Buffer.concat(encodeMessage(commandHeader(msgId, Command.REGION_WRITE), Buffer.alloc(size - HEADER_SIZE)));
  const decoder = (frames: Frame[] = []): FrameDecoder => new FrameDecoder({ onFrame: (f) => frames.push(f) });

  it("frames wholly inside a chunk cost nothing: 0", () => {
    const frames: Frame[] = [];
    const dec = decoder(frames);
    dec.push(Buffer.concat([frameOf(100, 1), frameOf(300, 2), frameOf(16, 3)]));
    expect(frames).toHaveLength(3);
    expect(dec.highWater).toBe(0);
  });

  it("a split header counts its bytes; once the header is whole, the frame's full size (its buffer is allocated then)", () => {
    const frames: Frame[] = [];
    const dec = decoder(frames);
    const f = frameOf(1000);
    dec.push(f.subarray(0, 10));
    expect(dec.highWater).toBe(10);
    dec.push(f.subarray(10, 16));
    expect(dec.highWater).toBe(1000);
    expect(dec.bufferedBytes).toBe(16);
    dec.push(f.subarray(16, 600));
    dec.push(f.subarray(600));
    expect(frames).toHaveLength(1);
    expect(dec.bufferedBytes).toBe(0);
    expect(dec.highWater).toBe(1000);
  });

  it("the start of a frame at the end of a chunk: that frame's size; smaller ones later do not lower it", () => {
    const frames: Frame[] = [];
    const dec = decoder(frames);
    const big = frameOf(500, 2);
    dec.push(Buffer.concat([frameOf(64, 1), big.subarray(0, 20)]));
    expect(frames).toHaveLength(1);
    expect(dec.highWater).toBe(500);
    dec.push(big.subarray(20));
    const small = frameOf(200, 3);
    dec.push(small.subarray(0, 5));
    dec.push(small.subarray(5));
    expect(frames).toHaveLength(3);
    expect(dec.highWater).toBe(500);
  });

  it("the largest of several partial frames, exactly", () => {
    const dec = decoder();
    for (const size of [40, 4096, 70_000, 1234]) {
      const f = frameOf(size);
      dec.push(f.subarray(0, 17));
      dec.push(f.subarray(17));
    }
    expect(dec.highWater).toBe(70_000);
  });

  it("a header over the limit allocates nothing: only the header's own bytes were held", () => {
    const dec = new FrameDecoder({ onFrame: () => {}, maxFrameSize: 4096 });
    const bad = header(2 ** 31, Command.REGION_WRITE);
    expect(() => dec.push(bad)).toThrow(FrameError);
    expect(dec.highWater).toBe(0);
    const split = new FrameDecoder({ onFrame: () => {}, maxFrameSize: 4096 });
    split.push(bad.subarray(0, 8));
    expect(() => split.push(bad.subarray(8))).toThrow(FrameError);
    expect(split.highWater).toBe(HEADER_SIZE);
  });

  it("survives close()", () => {
    const dec = decoder();
    dec.push(frameOf(3000).subarray(0, 100));
    dec.close();
    expect(dec.highWater).toBe(3000);
  });
});

describe("FrameDecoder: reading straight into a frame (readTarget/filled) and recycling large buffers", () => {
  const frameOf = (size: number, msgId = 1, fill = 0x5a): Buffer => {
    const f = Buffer.concat(encodeMessage(commandHeader(msgId, Command.MIG_DATA_WRITE), Buffer.alloc(size - HEADER_SIZE, fill)));
    for (let i = HEADER_SIZE; i < size; i++) f[i] = (i * 13 + msgId) & 0xff;
    return f;
  };

  it("offers the unfilled rest of a half-assembled frame, never more; filled() completes it with its fds", () => {
    const frames: Frame[] = [];
    const dec = new FrameDecoder({ onFrame: (f) => frames.push(f) });
    const f = frameOf(200_000);
    const next = frameOf(100, 2);
    expect(dec.readTarget()).toBeNull(); // nothing half-assembled
    dec.push(f.subarray(0, 5000));
    const t = dec.readTarget(16 * 1024)!;
    expect(t.length).toBe(200_000 - 5000);
    // a socket read into it: part of the rest
    f.copy(t, 0, 5000, 150_000);
    dec.filled(145_000, [7]);
    expect(frames).toHaveLength(0);
    const t2 = dec.readTarget(16 * 1024)!;
    expect(t2.length).toBe(50_000);
    expect(dec.readTarget(50_001)).toBeNull(); // less missing than asked for: the ordinary path
    f.copy(t2, 0, 150_000);
    dec.filled(50_000, [9]);
    expect(frames).toHaveLength(1);
    expect(Buffer.from(frames[0]!.body).equals(f.subarray(HEADER_SIZE))).toBe(true);
    expect(frames[0]!.fds).toEqual([7, 9]);
    expect(dec.readTarget()).toBeNull();
    // the ordinary path goes on after it
    dec.push(next);
    expect(frames).toHaveLength(2);
    expect(frames[1]!.header.msgId).toBe(2);
  });

  it("filled() beyond the frame, or without a target, is a FrameError that closes the decoder", () => {
    const dec = new FrameDecoder({ onFrame: () => undefined });
    expect(() => dec.filled(10)).toThrow(FrameError);
    const dec2 = new FrameDecoder({ onFrame: () => undefined });
    dec2.push(frameOf(100_000).subarray(0, 100));
    expect(() => dec2.filled(100_000)).toThrow(/does not fit the frame/);
    expect(dec2.closed).toBe(true);
    expect(dec2.readTarget()).toBeNull();
  });

  it("recycle(): a large frame's buffer takes the next large frame (same memory); small, foreign or in-use buffers are not taken", () => {
    const frames: Frame[] = [];
    const dec = new FrameDecoder({ onFrame: (f) => frames.push(f) });
    const a = frameOf(300_000, 1);
    dec.push(a.subarray(0, 1000));
    dec.push(a.subarray(1000));
    const first = frames[0]!;
    dec.recycle(first.body);
    const b = frameOf(200_000, 2);
    dec.push(b.subarray(0, 1000));
    dec.push(b.subarray(1000));
    const second = frames[1]!;
    expect(second.body.buffer).toBe(first.body.buffer); // reused
    expect(Buffer.from(second.body).equals(b.subarray(HEADER_SIZE))).toBe(true);
    // a frame larger than the spare gets fresh memory
    dec.recycle(second.body);
    const c = frameOf(400_000, 3);
    dec.push(c.subarray(0, 1000));
    dec.push(c.subarray(1000));
    expect(frames[2]!.body.buffer).not.toBe(first.body.buffer);
    // foreign buffers and small (pooled) frames are ignored
    const foreign = new FrameDecoder({ onFrame: () => undefined });
    foreign.recycle(Buffer.alloc(1 << 20));
    const small: Frame[] = [];
    const dec3 = new FrameDecoder({ onFrame: (f) => small.push(f) });
    const s = frameOf(1000, 4);
    dec3.push(s.subarray(0, 100));
    dec3.push(s.subarray(100));
    dec3.recycle(small[0]!.body);
    const s2 = frameOf(1000, 5);
    dec3.push(s2.subarray(0, 100));
    dec3.push(s2.subarray(100));
    // the pooled buffer did not become the spare: the next large frame has memory of its own
    const big = frameOf(100_000, 6);
    dec3.push(big.subarray(0, 1000));
    dec3.push(big.subarray(1000));
    expect(small[2]!.body.buffer).not.toBe(small[0]!.body.buffer);
    expect(small[2]!.body.buffer.byteLength).toBe(100_000);
    // the frame being assembled is never recycled under itself
    const d = frameOf(300_000, 7);
    dec.push(d.subarray(0, 1000));
    const inProgress = dec.readTarget()!;
    dec.recycle(inProgress);
    expect(dec.readTarget()!.buffer).toBe(inProgress.buffer);
  });
});

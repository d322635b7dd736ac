import { crc32 } from "node:zlib";
import { describe, expect, it } from "vitest";
import { Errno } from "../../../protocol/constants.ts";
import { VfioUserError } from "../../../protocol/errors.ts";
import {
  PREAMBLE_SIZE,
  RECORD_HEADER_SIZE,
  RecordKind,
  StateStreamReader,
  StateStreamWriter,
  type DecodedRecord,
  type DecodedStream,
  type StreamHeader,
} from "../../../src/migration/state-stream.ts";
import { refCrc32c } from "./crc32c-reference.ts";

const HEADER: StreamHeader = { deviceType: "edu", deviceVersion: 3, vendor: 0x1234 };
const STATE = {
  regs: { status: 0x1n, irqStatus: 0xdeadbeef, dmaSrc: 0xffff_ffff_ffff_f000n },
  fifo: [1, 2, 3],
  name: "card0",
  blob: new Uint8Array([9, 8, 7]),
  nested: { deep: { deeper: [true, false, null] } },
};

function bytesOf(n: number, seed: number): Uint8Array {
  const b = new Uint8Array(n);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    b[i] = x & 0xff;
  }
  return b;
}

const MEMORY: Array<[bigint, Uint8Array]> = [
  [0n, bytesOf(1, 1)],
  [0x1000n, bytesOf(4096, 2)],
  [0xffff_ffff_ffff_0000n, bytesOf(70_000, 3)],
  [0x42n, new Uint8Array(0)],
];

function writeSample(): StateStreamWriter {
  const w = new StateStreamWriter();
  w.header(HEADER);
  w.state(STATE);
  for (const [off, b] of MEMORY) w.memory(off, b);
  w.state({ second: 2n ** 63n });
  w.end();
  return w;
}

function drain(w: StateStreamWriter, max: number): Uint8Array {
  const parts: Uint8Array[] = [];
  for (;;) {
    const b = w.read(max);
    if (b.byteLength === 0) break;
    expect(b.byteLength).toBeLessThanOrEqual(max);
    parts.push(b);
  }
  return Buffer.concat(parts);
}

function sampleBytes(): Uint8Array {
  return drain(writeSample(), 1 << 30);
}

function feed(bytes: Uint8Array, chunk: number, reader = new StateStreamReader()): DecodedStream {
  for (let i = 0; i < bytes.byteLength; i += chunk) reader.push(bytes.subarray(i, i + chunk));
  return reader.finish();
}

/** Feed and finish; return the error, or null when the stream was accepted. */
function outcome(bytes: Uint8Array, chunk = bytes.byteLength || 1, reader = new StateStreamReader()): VfioUserError | null {
  try {
    feed(bytes, chunk, reader);
    return null;
  } catch (err) {
    if (!(err instanceof VfioUserError)) throw err;
    return err;
  }
}

function expectSample(got: DecodedStream): void {
  expect(got.header).toEqual(HEADER);
  expect(got.states).toHaveLength(2);
  expect(got.states[0]).toEqual(STATE);
  expect((got.states[0] as { blob: unknown }).blob).toBeInstanceOf(Uint8Array);
  expect(got.states[1]).toEqual({ second: 2n ** 63n });
  expect(got.memory.map((m) => m.offset)).toEqual(MEMORY.map(([o]) => o));
  got.memory.forEach((m, i) => expect(Buffer.from(m.bytes).equals(Buffer.from(MEMORY[i]![1]))).toBe(true));
  expect(got.records.map((r) => r.kind)).toEqual([
    RecordKind.STATE,
    RecordKind.MEMORY,
    RecordKind.MEMORY,
    RecordKind.MEMORY,
    RecordKind.MEMORY,
    RecordKind.STATE,
  ]);
}

/** A record built from the layout in the file comment, independently of the writer (version 2: CRC-32C; 1: zlib's CRC-32). */
function record(kind: number, payload: Uint8Array, opts: { length?: number; crc?: number; version?: 1 | 2 } = {}): Uint8Array {
  const head = Buffer.alloc(RECORD_HEADER_SIZE);
  head.writeUInt8(kind, 0);
  head.writeUInt32LE(opts.length ?? payload.byteLength, 1);
  const crc = Buffer.alloc(4);
  const sum = opts.version === 1 ? crc32 : refCrc32c;
  crc.writeUInt32LE(opts.crc ?? sum(payload, sum(head)), 0);
  return Buffer.concat([head, payload, crc]);
}

const PREAMBLE = Buffer.from([0x56, 0x55, 0x44, 0x53, 2, 0, 0, 0]);
const PREAMBLE_V1 = Buffer.from([0x56, 0x55, 0x44, 0x53, 1, 0, 0, 0]);
// msgpack of { deviceType: "x", deviceVersion: 1 } as msgpackr writes it (map16).
const HEADER_X = Buffer.from("de0002aa64657669636554797065a178ad64657669636556657273696f6e01", "hex");

describe("state stream layout", () => {
  it("matches hand-built bytes for a minimal stream", () => {
    const w = new StateStreamWriter();
    w.header({ deviceType: "x", deviceVersion: 1 });
    w.memory(0x0102030405060708n, new Uint8Array([0xaa, 0xbb]));
    w.end();
    const memPayload = Buffer.from([8, 7, 6, 5, 4, 3, 2, 1, 0xaa, 0xbb]);
    const want = Buffer.concat([
      PREAMBLE,
      record(RecordKind.HEADER, HEADER_X),
      record(RecordKind.MEMORY, memPayload),
      record(RecordKind.END, new Uint8Array(0)),
    ]);
    expect(Buffer.from(drain(w, 1000)).toString("hex")).toBe(want.toString("hex"));
    // The END record is kind 4, length 0, CRC-32C of those five bytes (golden value).
    expect(want.subarray(want.length - 9).toString("hex")).toBe("0400000000" + Buffer.from(Uint32Array.of(refCrc32c(Buffer.from([4, 0, 0, 0, 0]))).buffer).toString("hex"));
    expect(refCrc32c(Buffer.from("123456789"))).toBe(0xe3069283);
  });

  it("reads a version 1 stream (zlib's CRC-32), as earlier builds saved it", () => {
    const v1 = Buffer.concat([
      PREAMBLE_V1,
      record(RecordKind.HEADER, HEADER_X, { version: 1 }),
      record(RecordKind.MEMORY, Buffer.from([0, 0x10, 0, 0, 0, 0, 0, 0, 1, 2, 3]), { version: 1 }),
      record(RecordKind.END, new Uint8Array(0), { version: 1 }),
    ]);
    const reader = new StateStreamReader();
    const got = feed(v1, 3, reader);
    expect(reader.version).toBe(1);
    expect(got.memory).toEqual([{ offset: 0x1000n, bytes: Uint8Array.from([1, 2, 3]) }]);
    // the same bytes with a version 2 preamble fail on the first record's check
    const asV2 = Buffer.concat([PREAMBLE, v1.subarray(8)]);
    expect(outcome(asV2)?.message).toMatch(/CRC mismatch in HEADER record at offset 8/);
  });
});

describe("round trip", () => {
  const whole = sampleBytes();
  for (const readMax of [1, 7, 4096, 1 << 30]) {
    for (const chunk of [1, 7, 4096, whole.byteLength]) {
      it(`read ${readMax} at a time, fed ${chunk} at a time`, () => {
        const bytes = drain(writeSample(), readMax);
        expect(Buffer.from(bytes).equals(Buffer.from(whole))).toBe(true);
        const got = feed(bytes, chunk);
        expectSample(got);
        expect(got.byteLength).toBe(whole.byteLength);
      });
    }
  }

  it("readSegments hands out the caller's memory bytes without copying", () => {
    const big = bytesOf(10_000, 9);
    const w = new StateStreamWriter();
    w.header(HEADER);
    w.memory(0n, big);
    w.end();
    const total = w.pendingBytes;
    const segs = w.readSegments(Number.MAX_SAFE_INTEGER);
    expect(segs.some((s) => s.buffer === big.buffer && s.byteLength === big.byteLength)).toBe(true);
    expect(segs.reduce((n, s) => n + s.byteLength, 0)).toBe(total);
    expect(w.pendingBytes).toBe(0);
    expect(w.done).toBe(true);
    expect(w.read(100).byteLength).toBe(0);
    const got = feed(Buffer.concat(segs), 333);
    expect(Buffer.from(got.memory[0]!.bytes).equals(Buffer.from(big))).toBe(true);
  });

  it("read() within one segment is a view, across segments a copy", () => {
    const big = bytesOf(5000, 4);
    const w = new StateStreamWriter();
    w.header(HEADER);
    w.memory(0n, big);
    const before = w.pendingBytes;
    // Skip to the memory bytes: everything before them is small segments.
    const lead = before - big.byteLength - 4;
    expect(w.read(lead).byteLength).toBe(lead);
    const view = w.read(100);
    expect(view.buffer).toBe(big.buffer);
    expect(w.pendingBytes).toBe(before - lead - 100);
    expect(w.bytesRead).toBe(lead + 100);
  });

  it("pendingBytes counts what is queued", () => {
    const w = new StateStreamWriter();
    expect(w.pendingBytes).toBe(0);
    w.header(HEADER);
    const afterHeader = w.pendingBytes;
    expect(afterHeader).toBeGreaterThan(PREAMBLE_SIZE + RECORD_HEADER_SIZE + 4);
    w.memory(0n, new Uint8Array(1000));
    expect(w.pendingBytes).toBe(afterHeader + RECORD_HEADER_SIZE + 8 + 1000 + 4);
    w.read(10);
    expect(w.pendingBytes).toBe(afterHeader + RECORD_HEADER_SIZE + 8 + 1000 + 4 - 10);
    expect(w.read(0).byteLength).toBe(0);
    expect(w.read(-5).byteLength).toBe(0);
  });

  it("an onRecord sink receives every record in order, the HEADER first, instead of collecting them", () => {
    const seen: DecodedRecord[] = [];
    const reader = new StateStreamReader({ onRecord: (r) => seen.push(r) });
    const got = feed(sampleBytes(), 100, reader);
    expect(got.records).toEqual([]);
    expect(got.header).toEqual(HEADER);
    expect(seen.map((r) => r.kind)).toEqual([RecordKind.HEADER, 2, 3, 3, 3, 3, 2]);
    expect(seen[0]).toEqual({ kind: RecordKind.HEADER, header: HEADER });
  });

  it("a sink that refuses the HEADER fails the stream before any later record reaches it", () => {
    const seen: number[] = [];
    const reader = new StateStreamReader({
      onRecord: (r) => {
        seen.push(r.kind);
        if (r.kind === RecordKind.HEADER) throw new VfioUserError(Errno.EINVAL, "wrong device type");
      },
    });
    expect(() => reader.push(sampleBytes())).toThrow(/wrong device type/);
    expect(seen).toEqual([RecordKind.HEADER]);
  });

  it("a sink that throws fails the stream", () => {
    const boom = new VfioUserError(Errno.EIO, "device rejected state");
    const reader = new StateStreamReader({
      onRecord: () => {
        throw boom;
      },
    });
    const bytes = sampleBytes();
    expect(() => reader.push(bytes)).toThrow(boom);
    expect(() => reader.finish()).toThrow(boom);
  });
});

describe("damage is detected", () => {
  // Small stream: header, one state, one memory record, end.
  const small = (() => {
    const w = new StateStreamWriter();
    w.header({ deviceType: "x", deviceVersion: 1 });
    w.state({ a: 1, b: [2n, "c"] });
    w.memory(0x1000n, bytesOf(40, 5));
    w.end();
    return drain(w, 1 << 20);
  })();

  it("the undamaged small stream is accepted", () => {
    expect(outcome(small)).toBeNull();
  });

  it("every single-byte flip, fed whole and fed byte by byte", () => {
    const missed: string[] = [];
    for (let i = 0; i < small.byteLength; i++) {
      for (const x of [0x01, 0x80, 0xff, 0x5a]) {
        const bad = Uint8Array.from(small);
        bad[i]! ^= x;
        for (const chunk of [bad.byteLength, 1]) {
          const err = outcome(bad, chunk);
          if (err === null || err.errno !== Errno.EINVAL) missed.push(`offset ${i} xor 0x${x.toString(16)} chunk ${chunk}`);
        }
      }
    }
    expect(missed).toEqual([]);
  });

  it("every truncation point", () => {
    const missed: number[] = [];
    for (let n = 0; n < small.byteLength; n++) {
      for (const chunk of [n || 1, 1, 3]) {
        const err = outcome(small.subarray(0, n), chunk);
        if (err === null || err.errno !== Errno.EINVAL) missed.push(n);
      }
    }
    expect(missed).toEqual([]);
  });

  it("every missing byte", () => {
    const missed: number[] = [];
    for (let i = 0; i < small.byteLength; i++) {
      const bad = Buffer.concat([small.subarray(0, i), small.subarray(i + 1)]);
      if (outcome(bad) === null) missed.push(i);
    }
    expect(missed).toEqual([]);
  });

  it("an extra trailing byte, or anything after END", () => {
    expect(outcome(Buffer.concat([small, Buffer.from([0])]))?.message).toMatch(/after the END record/);
    expect(outcome(Buffer.concat([small, Buffer.from([0])]), 1)?.message).toMatch(/after the END record/);
    const again = record(RecordKind.STATE, Buffer.from([0xc0]));
    expect(outcome(Buffer.concat([small, again]))?.message).toMatch(/after the END record/);
  });

  it("precise messages for each failure", () => {
    const end = record(RecordKind.END, new Uint8Array(0));
    const hdr = record(RecordKind.HEADER, HEADER_X);
    const cases: Array<[string, Uint8Array, RegExp]> = [
      ["empty", new Uint8Array(0), /empty stream/],
      ["short preamble", PREAMBLE.subarray(0, 5), /inside the preamble \(5 of 8/],
      ["wrong magic", Buffer.concat([Buffer.from("VUDT"), PREAMBLE.subarray(4), hdr, end]), /bad magic 0x56554454/],
      ["version 3", Buffer.concat([PREAMBLE.subarray(0, 4), Buffer.from([3, 0, 0, 0]), hdr, end]), /unknown stream version 3 \(this build reads 1 and 2\)/],
      ["version 0", Buffer.concat([PREAMBLE.subarray(0, 4), Buffer.from([0, 0, 0, 0]), hdr, end]), /unknown stream version 0/],
      ["flags", Buffer.concat([PREAMBLE.subarray(0, 6), Buffer.from([1, 0]), hdr, end]), /unknown stream flags 0x1/],
      ["unknown kind", Buffer.concat([PREAMBLE, hdr, record(9, Buffer.from([1])), end]), /unknown record kind 9 at offset 48/],
      ["kind zero", Buffer.concat([PREAMBLE, record(0, new Uint8Array(0))]), /unknown record kind 0 at offset 8/],
      ["no header", Buffer.concat([PREAMBLE, record(RecordKind.STATE, Buffer.from([0xc0])), end]), /first record is STATE/],
      ["two headers", Buffer.concat([PREAMBLE, hdr, hdr, end]), /second HEADER/],
      ["no END", Buffer.concat([PREAMBLE, hdr]), /no END record/],
      ["cut header", Buffer.concat([PREAMBLE, hdr, end.subarray(0, 3)]), /inside a record header at offset 48 \(3 of 5/],
      ["cut payload", Buffer.concat([PREAMBLE, hdr.subarray(0, 10)]), /inside HEADER record at offset 8 \(5 of 31 payload/],
      ["cut crc", Buffer.concat([PREAMBLE, hdr.subarray(0, hdr.length - 1)]), /inside the CRC of HEADER record/],
      ["bad crc", Buffer.concat([PREAMBLE, record(RecordKind.HEADER, HEADER_X, { crc: 1 }), end]), /CRC mismatch in HEADER record at offset 8 \(stored 0x00000001/],
      ["END with payload", Buffer.concat([PREAMBLE, hdr, record(RecordKind.END, Buffer.from([1]))]), /END record at offset 48 declares 1 bytes/],
      ["short MEMORY", Buffer.concat([PREAMBLE, hdr, record(RecordKind.MEMORY, Buffer.alloc(7)), end]), /MEMORY record .* less than its 8-byte offset/],
      ["header not a map", Buffer.concat([PREAMBLE, record(RecordKind.HEADER, Buffer.from([0x01])), end]), /bad HEADER record .* not a map/],
      [
        "header without deviceType",
        Buffer.concat([PREAMBLE, record(RecordKind.HEADER, Buffer.from("81ad64657669636556657273696f6e01", "hex")), end]),
        /deviceType must be/,
      ],
      ["state not msgpack", Buffer.concat([PREAMBLE, hdr, record(RecordKind.STATE, Buffer.from([0x92, 0x01])), end]), /bad STATE record at offset 48/],
      ["state with trailing bytes", Buffer.concat([PREAMBLE, hdr, record(RecordKind.STATE, Buffer.from([0xc0, 0xc0])), end]), /bad STATE record/],
    ];
    for (const [name, bytes, pattern] of cases) {
      for (const chunk of [bytes.byteLength || 1, 1]) {
        const err = outcome(bytes, chunk);
        expect(err, name).toBeInstanceOf(VfioUserError);
        expect(err!.errno, name).toBe(Errno.EINVAL);
        expect(err!.message, name).toMatch(pattern);
      }
    }
  });

  it("a huge declared length is refused from the record header alone", () => {
    const head = Buffer.alloc(RECORD_HEADER_SIZE);
    head.writeUInt8(RecordKind.STATE, 0);
    head.writeUInt32LE(0xffff_ffff, 1);
    const reader = new StateStreamReader();
    reader.push(Buffer.concat([PREAMBLE, record(RecordKind.HEADER, HEADER_X)]));
    // The record header is the last thing pushed: no payload byte exists yet.
    expect(() => reader.push(head)).toThrowError(/declares 4294967295 bytes, above the limit of 268435456/);
    // The failure sticks.
    expect(() => reader.push(new Uint8Array(1))).toThrowError(/declares 4294967295/);
    expect(() => reader.finish()).toThrowError(/declares 4294967295/);
  });

  it("the limit is configurable and applies to the writer too", () => {
    const reader = new StateStreamReader({ maxRecordLength: 100 });
    reader.push(Buffer.concat([PREAMBLE, record(RecordKind.HEADER, HEADER_X)]));
    const head = Buffer.from([RecordKind.MEMORY, 101, 0, 0, 0]);
    expect(() => reader.push(head)).toThrowError(/above the limit of 100/);

    const w = new StateStreamWriter({ maxRecordLength: 100 });
    w.header({ deviceType: "x", deviceVersion: 1 });
    w.memory(0n, new Uint8Array(92)); // 8 + 92 = 100: allowed
    expect(() => w.memory(0n, new Uint8Array(93))).toThrowError(expect.objectContaining({ errno: Errno.E2BIG }));
    expect(() => new StateStreamReader({ maxRecordLength: 2 ** 32 })).toThrowError(RangeError);
  });

  it("does not keep a reference to pushed chunks (Uint8Array or Buffer)", () => {
    for (const bytes of [Uint8Array.from(sampleBytes()), Buffer.from(sampleBytes())]) {
      for (const chunk of [bytes.byteLength, 1000]) {
        const reader = new StateStreamReader();
        for (let i = 0; i < bytes.byteLength; i += chunk) reader.push(bytes.subarray(i, i + chunk));
        bytes.fill(0);
        expectSample(reader.finish());
        bytes.set(sampleBytes());
      }
    }
  });

  it("a memory buffer changed after queueing is caught at the destination", () => {
    const data = bytesOf(64, 6);
    const w = new StateStreamWriter();
    w.header(HEADER);
    w.memory(0n, data);
    w.end();
    data[10]! ^= 1;
    expect(outcome(drain(w, 1 << 20))?.message).toMatch(/CRC mismatch in MEMORY record/);
  });
});

describe("writer misuse", () => {
  it("refuses records out of order", () => {
    const w = new StateStreamWriter();
    expect(() => w.state({})).toThrowError(/before header/);
    expect(() => w.memory(0n, new Uint8Array(1))).toThrowError(/before header/);
    expect(() => w.end()).toThrowError(/before header/);
    w.header(HEADER);
    expect(() => w.header(HEADER)).toThrowError(/twice/);
    expect(() => w.memory(-1n, new Uint8Array(1))).toThrowError(/not a u64/);
    expect(() => w.memory(1n << 64n, new Uint8Array(1))).toThrowError(/not a u64/);
    w.end();
    expect(w.ended).toBe(true);
    expect(() => w.state({})).toThrowError(/after end/);
    expect(() => w.end()).toThrowError(/after end/);
  });

  it("refuses a bad header", () => {
    expect(() => new StateStreamWriter().header({ deviceType: "", deviceVersion: 1 })).toThrowError(/deviceType/);
    expect(() => new StateStreamWriter().header({ deviceType: "x", deviceVersion: -1 })).toThrowError(/deviceVersion/);
    expect(() => new StateStreamWriter().header({ deviceType: "x", deviceVersion: 1.5 })).toThrowError(/deviceVersion/);
  });

  it("push after finish is refused", () => {
    const reader = new StateStreamReader();
    feed(sampleBytes(), 1 << 20, reader);
    expect(() => reader.push(new Uint8Array(1))).toThrowError(/after finish/);
  });
});

describe("StateStreamReader: judgeRecord and memorySink", () => {
  /** A reader whose sink records what it was handed, with the sample stream's MEMORY records. */
  function sinking(): { reader: StateStreamReader; got: Map<bigint, number[]>; ended: bigint[]; order: string[] } {
    const got = new Map<bigint, number[]>();
    const ended: bigint[] = [];
    const order: string[] = [];
    let current = 0n;
    const reader = new StateStreamReader({
      onRecord: (r) => void order.push(r.kind === RecordKind.HEADER ? "HEADER" : r.kind === RecordKind.STATE ? "STATE" : "MEMORY-as-record"),
      memorySink: {
        begin: (offset, length) => {
          current = offset;
          got.set(offset, []);
          order.push(`begin ${offset} ${length}`);
        },
        data: (bytes) => void got.get(current)!.push(...bytes),
        end: () => void ended.push(current),
      },
    });
    return { reader, got, ended, order };
  }

  for (const chunk of [1, 7, 4096, 1 << 20]) {
    it(`hands MEMORY data to the sink in order, fed ${chunk} at a time, and buffers none of it`, () => {
      const { reader, got, ended, order } = sinking();
      const decoded = feed(sampleBytes(), chunk, reader);
      expect(decoded.memory).toEqual([]);
      expect(ended).toEqual(MEMORY.map(([o]) => o));
      for (const [offset, bytes] of MEMORY) expect(Uint8Array.from(got.get(offset)!)).toEqual(bytes);
      expect(order.filter((o) => o === "MEMORY-as-record")).toEqual([]);
      // only HEADER and STATE payloads were held (the 70,000-byte MEMORY record was not)
      expect(reader.bufferedHighWater).toBeLessThan(1000);
    });
  }

  it("a CRC mismatch in a sunk MEMORY record is thrown after its data went to the sink, and end() is not called", () => {
    const bytes = sampleBytes();
    const { reader, ended, got } = sinking();
    // a MEMORY record's last data byte: flip it (its CRC then fails)
    const damaged = new Uint8Array(bytes);
    const lastMem = MEMORY[2]!; // the 70,000-byte record
    const at = findSubarray(damaged, lastMem[1]) + lastMem[1].length - 1;
    damaged[at]! ^= 0xff;
    expect(() => feed(damaged, 4096, reader)).toThrowError(/CRC mismatch in MEMORY record/);
    expect(ended).not.toContain(lastMem[0]);
    expect(got.get(lastMem[0])!.length).toBe(lastMem[1].length);
  });

  it("judgeRecord sees kind, length and offset at each header, before any payload; a throw refuses there", () => {
    const seen: Array<[number, number, number]> = [];
    const bytes = sampleBytes();
    const reader = new StateStreamReader({
      judgeRecord: (kind, length, at) => {
        seen.push([kind, length, at]);
        if (kind === RecordKind.MEMORY && length > 60_000) throw new VfioUserError(Errno.EINVAL, "too long for this consumer");
      },
    });
    const err = outcome(bytes, 1, reader);
    expect(err?.message).toBe("too long for this consumer");
    const last = seen[seen.length - 1]!;
    expect(last[0]).toBe(RecordKind.MEMORY);
    // refused right after the record header: the reader took nothing of the payload
    expect(reader.byteLength).toBe(last[2] + RECORD_HEADER_SIZE);
    expect(seen[0]).toEqual([RecordKind.HEADER, expect.any(Number), PREAMBLE_SIZE]);
  });
});

function findSubarray(hay: Uint8Array, needle: Uint8Array): number {
  outer: for (let i = 0; i + needle.length <= hay.length; i++) {
    for (let j = 0; j < needle.length; j++) if (hay[i + j] !== needle[j]) continue outer;
    return i;
  }
  throw new Error("not found");
}

describe("StateStreamWriter.state limit", () => {
  it("refuses a STATE record above the given limit with E2BIG, and takes one at it", () => {
    const w = new StateStreamWriter();
    w.header(HEADER);
    const value = new Uint8Array(1000);
    expect(() => w.state(value, 999)).toThrowError(/STATE record of 100\d bytes exceeds the limit of 999/);
    try {
      w.state(value, 999);
    } catch (err) {
      expect((err as VfioUserError).errno).toBe(Errno.E2BIG);
    }
    expect(() => w.state(new Uint8Array(10), 20)).not.toThrow();
  });
});

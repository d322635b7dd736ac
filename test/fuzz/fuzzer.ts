/**
 * A structure-aware fuzzer for the server, over a real socket to a server in
 * a child process.
 *
 * Every message starts as a valid one of some command (random but legal
 * field values), then 0..3 mutations are applied: bit flips, field boundary
 * values (0, 1, 2^31, 2^32-1, 2^63, 2^64-1, ...), body length changes and
 * truncation, header tampering (command, size, flags, error), whole random
 * byte strings, random fds (memfds / eventfds, some of them hostile:
 * blocking, counter preset to 2^64 - 2) attached, big bodies. Bytes
 * go out split at random points, sometimes several messages in one send.
 *
 * The fuzzer knows which messages the server must answer (well-framed
 * commands without No_reply) and waits for those replies (a missing one is
 * a hang); after a message that breaks the framing it drops the connection
 * and reconnects (the server closing such a connection is expected). Server
 * to client DMA requests are answered, sometimes badly. Every `probeEvery`
 * messages it closes its connection and a fresh one must do VERSION and read
 * the vendor id (health probe); the server's fd count (and, for the log
 * line, its RSS) are sampled there. At the end the result carries the
 * server's V8 figures after a full GC at start and end, and its own
 * accounting (VfioUserServer.stats()): what callers judge. A server exit is
 * a crash, a probe or reply timeout a hang.
 *
 * All randomness comes from one seeded PRNG, so `--seed S` replays a run;
 * failures print the seed and the index of the message.
 */
import { readFileSync, writeSync } from "node:fs";
import {
  Command,
  DmaMapFlags,
  DmaUnmapFlags,
  Feature,
  FeatureFlags,
  HEADER_SIZE,
  HeaderFlags,
  IrqSetFlags,
  MigState,
  encodeHeader,
  type Frame,
  type Header,
} from "../../protocol/index.ts";
import { RecordKind, StateStreamWriter } from "../../src/migration/state-stream.ts";
import { native } from "../../src/transport/native.ts";
import type { ServerStats } from "../../src/server/server.ts";
import { ChildServer, RawClient, eventually, frameBytes, le, sleep, versionBody, type Le } from "../robustness/raw-client.ts";

// ------------------------------------------------------------------ PRNG

/** sfc32, seeded through splitmix32: small, fast, good enough, reproducible. */
export class Rng {
  private a: number;
  private b: number;
  private c: number;
  private d: number;

  constructor(seed: number) {
    let s = seed >>> 0;
    const next = (): number => {
      s = (s + 0x9e3779b9) >>> 0;
      let z = s;
      z = Math.imul(z ^ (z >>> 16), 0x85ebca6b) >>> 0;
      z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35) >>> 0;
      return (z ^ (z >>> 16)) >>> 0;
    };
    this.a = next();
    this.b = next();
    this.c = next();
    this.d = next();
    for (let i = 0; i < 12; i++) this.u32();
  }

  u32(): number {
    const t = (((this.a + this.b) >>> 0) + this.d) >>> 0;
    this.d = (this.d + 1) >>> 0;
    this.a = this.b ^ (this.b >>> 9);
    this.b = (this.c + (this.c << 3)) >>> 0;
    this.c = ((this.c << 21) | (this.c >>> 11)) >>> 0;
    this.c = (this.c + t) >>> 0;
    return t;
  }

  /** Integer in [0, n). */
  int(n: number): number {
    return n <= 1 ? 0 : Math.floor((this.u32() / 0x1_0000_0000) * n);
  }

  range(lo: number, hi: number): number {
    return lo + this.int(hi - lo + 1);
  }

  chance(p: number): boolean {
    return this.u32() / 0x1_0000_0000 < p;
  }

  pick<T>(items: readonly T[]): T {
    return items[this.int(items.length)]!;
  }

  u64(): bigint {
    return (BigInt(this.u32()) << 32n) | BigInt(this.u32());
  }

  bytes(n: number): Buffer {
    const b = Buffer.allocUnsafe(n);
    for (let i = 0; i < n; i++) b[i] = this.u32() & 0xff;
    return b;
  }
}

// ------------------------------------------------------------------ messages

/** "eventfd-full": blocking, its counter preset to 2^64 - 2 (a write of 1 would block). */
type FdKind = "memfd" | "eventfd" | "eventfd-full";

/** A message before it is framed. */
interface Draft {
  command: number;
  body: Buffer;
  fds: FdKind[];
  /** Size of the memfds (DMA_MAP wants them to match). */
  memfdSize: bigint;
  flags: number;
  error: number;
  /** Header size when it lies; undefined = honest. */
  size?: number;
  /** Replace the whole frame with these bytes. */
  raw?: Buffer;
  /** Short tag for reports. */
  tag: string;
}

const U32_BOUNDS = [0, 1, 2, 0xff, 0x100, 0xfff, 0x1000, 0x7fff_ffff, 0x8000_0000, 0xffff_fffe, 0xffff_ffff];
const U64_BOUNDS = [0n, 1n, 0xffff_ffffn, 0x1_0000_0000n, 1n << 31n, 1n << 63n, (1n << 64n) - 1n, (1n << 64n) - 4096n, (1n << 64n) - 2n, 1n << 48n];
const KNOWN_COMMANDS: readonly number[] = Object.values(Command);
const NAMES = new Map<number, string>(Object.entries(Command).map(([n, v]) => [v, n]));
const UNKNOWN_COMMANDS = [0, 14, 20, 21, 100, 0x7fff, 0xffff];
const MIG_STATES: readonly number[] = Object.values(MigState);

function pick<T>(r: Rng, items: readonly T[]): T {
  return r.pick(items);
}

function pow2(r: Rng, minLog: number, maxLog: number): number {
  return 2 ** r.range(minLog, maxLog);
}

function featureBody(r: Rng): Buffer {
  const G = FeatureFlags.GET;
  const S = FeatureFlags.SET;
  const P = r.chance(0.1) ? FeatureFlags.PROBE : 0;
  switch (r.int(8)) {
    case 0:
      return le().u32(16).u32(Feature.MIGRATION | G | P).bytes(8).buf;
    case 1:
      return le().u32(16).u32(Feature.MIG_DEVICE_STATE | G | P).bytes(8).buf;
    case 2:
    case 3:
      // walk the FSM around (RUNNING / STOP / PRE_COPY / STOP_COPY / RESUMING, sometimes nonsense)
      return le().u32(16).u32(Feature.MIG_DEVICE_STATE | S | P).u32(r.chance(0.9) ? pick(r, [1, 2, 3, 4, 6]) : pick(r, MIG_STATES)).s32(-1).buf;
    case 4: {
      const n = r.int(4);
      const b = le().u32(0xffff).u32(Feature.DMA_LOGGING_START | S | P).u64(pick(r, [4096, 8192, 1 << 21, 3])).u32(n).u32(0);
      for (let i = 0; i < n; i++) b.u64(BigInt(r.int(64)) << 20n).u64(BigInt(pow2(r, 12, 22)));
      return b.buf;
    }
    case 5:
      return le().u32(16).u32(Feature.DMA_LOGGING_STOP | S | P).buf;
    case 6:
      return le().u32(r.chance(0.5) ? 0xffff : 64).u32(Feature.DMA_LOGGING_REPORT | G | P).u64(BigInt(r.int(64)) << 20n).u64(BigInt(pow2(r, 12, 24))).u64(pick(r, [4096n, 8192n, 1n << 21n])).buf;
    default:
      return le().u32(16).u32(Feature.MIG_DATA_SIZE | G | P).bytes(8).buf;
  }
}

function access(region: number, offset: bigint, count: number, data?: Buffer): Buffer {
  return le().u64(offset).u32(region).u32(count).bytes(data ?? Buffer.alloc(0)).buf;
}

/** A valid-looking message of a random command. */
function template(r: Rng): Draft {
  const d: Draft = { command: 0, body: Buffer.alloc(0), fds: [], memfdSize: 4096n, flags: HeaderFlags.TYPE_COMMAND, error: 0, tag: "" };
  const region = (): number => (r.chance(0.8) ? pick(r, [0, 0, 7, 7, 2]) : r.int(10));
  const offset = (): bigint => (r.chance(0.7) ? BigInt(pick(r, [0, 4, 8, 0x20, 0x24, 0x60, 0x64, 0x80, 0x88, 0x90, 0x98, 0x04, 0x3c, 0x40])) : BigInt(r.int(4096)));
  const count = (): number => (r.chance(0.85) ? pick(r, [1, 2, 4, 4, 8]) : r.range(1, 4096));
  const cmd = r.int(40);
  if (cmd < 2) {
    d.command = Command.VERSION;
    const caps: Record<string, unknown> = {};
    if (r.chance(0.7)) caps.max_msg_fds = r.range(0, 32);
    if (r.chance(0.7)) caps.max_data_xfer_size = pick(r, [1, 4096, 65536, 1 << 20, 0xffff_ffff]);
    if (r.chance(0.3)) caps.migration = { pgsize: pick(r, [4096, 8192, 1]), max_bitmap_size: r.range(0, 1 << 20) };
    if (r.chance(0.2)) caps.twin_socket = { supported: r.chance(0.5) };
    d.body = versionBody({ capabilities: caps });
  } else if (cmd < 5) {
    d.command = Command.DMA_MAP;
    const size = BigInt(pow2(r, 12, 20));
    const withFd = r.chance(0.7);
    d.memfdSize = size + (r.chance(0.2) ? 4096n : 0n);
    d.body = le().u32(32).u32(r.chance(0.9) ? DmaMapFlags.READ | DmaMapFlags.WRITE : r.int(4)).u64(withFd && r.chance(0.2) ? 4096n : 0n).u64(r.chance(0.3) ? 0n : BigInt(r.int(256)) << 20n).u64(size).buf;
    if (withFd) d.fds = ["memfd"];
  } else if (cmd < 7) {
    d.command = Command.DMA_UNMAP;
    const all = r.chance(0.3);
    d.body = le().u32(24).u32(all ? DmaUnmapFlags.ALL : 0).u64(all ? 0n : BigInt(r.int(256)) << 20n).u64(all ? 0n : BigInt(pow2(r, 12, 20))).buf;
  } else if (cmd < 8) {
    d.command = Command.DEVICE_GET_INFO;
    d.body = le().u32(16).u32(0).u32(0).u32(0).buf;
  } else if (cmd < 9) {
    d.command = Command.DEVICE_GET_REGION_INFO;
    d.body = le().u32(r.chance(0.8) ? 32 : 4096).u32(0).u32(r.int(10)).u32(0).u64(0).u64(0).buf;
  } else if (cmd < 10) {
    d.command = Command.DEVICE_GET_REGION_IO_FDS;
    d.body = le().u32(r.chance(0.8) ? 16 : 4096).u32(0).u32(r.int(10)).u32(0).buf;
  } else if (cmd < 11) {
    d.command = Command.DEVICE_GET_IRQ_INFO;
    d.body = le().u32(16).u32(0).u32(r.int(6)).u32(0).buf;
  } else if (cmd < 15) {
    d.command = Command.DEVICE_SET_IRQS;
    const index = r.chance(0.9) ? r.int(2) : r.int(5);
    const kind = r.int(6);
    if (kind === 0) {
      const n = r.int(3);
      d.body = le().u32(20).u32(IrqSetFlags.ACTION_TRIGGER | IrqSetFlags.DATA_EVENTFD).u32(index).u32(0).u32(n).buf;
      d.fds = Array.from({ length: n }, () => (r.chance(0.2) ? "eventfd-full" : "eventfd"));
    } else if (kind === 5) {
      // DATA_EVENTFD without fds: de-assign (QEMU's shape for unused MSI-X vectors)
      d.body = le().u32(20).u32(IrqSetFlags.ACTION_TRIGGER | IrqSetFlags.DATA_EVENTFD).u32(index).u32(r.int(3)).u32(r.range(1, 3)).buf;
    } else if (kind === 1) {
      d.body = le().u32(20).u32(IrqSetFlags.ACTION_TRIGGER | IrqSetFlags.DATA_NONE).u32(index).u32(0).u32(r.int(2)).buf;
    } else if (kind === 2) {
      const n = r.range(1, 2);
      d.body = le().u32(20 + n).u32(pick(r, [IrqSetFlags.ACTION_TRIGGER, IrqSetFlags.ACTION_MASK, IrqSetFlags.ACTION_UNMASK]) | IrqSetFlags.DATA_BOOL).u32(index).u32(0).u32(n).bytes(r.bytes(n)).buf;
    } else {
      d.body = le().u32(20).u32(pick(r, [IrqSetFlags.ACTION_MASK, IrqSetFlags.ACTION_UNMASK]) | IrqSetFlags.DATA_NONE).u32(index).u32(0).u32(1).buf;
    }
  } else if (cmd < 21) {
    d.command = Command.REGION_READ;
    d.body = access(region(), offset(), r.chance(0.02) ? pick(r, [1 << 16, 1 << 20]) : count());
  } else if (cmd < 28) {
    d.command = Command.REGION_WRITE;
    const reg = region();
    // now and then: memory + bus master on in the command register (so DMA paths run), or an edu DMA start
    let data = r.bytes(count());
    let at = offset();
    if (reg === 7 && r.chance(0.3)) {
      at = 4n;
      data = Buffer.from([0x06, 0x00]);
    } else if (reg === 0 && r.chance(0.1)) {
      at = 0x98n;
      data = le().u64(pick(r, [1, 3, 5, 7])).buf;
    }
    d.body = access(reg, at, data.length, data);
  } else if (cmd < 30 && r.chance(0.3)) {
    // edu DMA in one message: memory + bus master on, source, destination, count, start
    // (to RAM: the server sends DMA_WRITE, from RAM: DMA_READ, unless the range is fd-mapped)
    d.command = Command.REGION_WRITE_MULTI;
    const toRam = r.chance(0.5);
    const guest = BigInt(r.int(1 << 20)) & ~7n;
    const local = 0x40000n + BigInt(r.int(4000));
    const w = (region: number, offset: bigint, count: number, value: bigint): Le => {
      const b = Buffer.alloc(8);
      b.writeBigUInt64LE(value & 0xffff_ffff_ffff_ffffn);
      return le().u64(offset).u32(region).u32(count).bytes(b);
    };
    d.body = Buffer.concat([
      le().u64(5).buf,
      w(7, 4n, 2, 6n).buf,
      w(0, 0x80n, 8, toRam ? local : guest).buf,
      w(0, 0x88n, 8, toRam ? guest : local).buf,
      w(0, 0x90n, 8, BigInt(r.range(1, 96))).buf,
      w(0, 0x98n, 8, toRam ? 7n : 5n).buf,
    ]);
  } else if (cmd < 30) {
    d.command = Command.REGION_WRITE_MULTI;
    const n = r.range(1, 6);
    const b = le().u64(n);
    for (let i = 0; i < n; i++) b.u64(offset()).u32(region()).u32(pick(r, [1, 2, 4, 8])).bytes(r.bytes(8));
    d.body = b.buf;
  } else if (cmd < 31) {
    d.command = Command.DEVICE_RESET;
  } else if (cmd < 35) {
    d.command = Command.DEVICE_FEATURE;
    d.body = featureBody(r);
  } else if (cmd < 37) {
    d.command = Command.MIG_DATA_READ;
    const n = r.chance(0.8) ? r.range(0, 4096) : r.range(0, 1 << 16);
    d.body = le().u32(8 + n).u32(n).buf;
  } else if (cmd < 38) {
    d.command = Command.MIG_DATA_WRITE;
    const data = r.chance(0.4)
      ? lyingStream(r)
      : r.chance(0.5)
        ? Buffer.concat([Buffer.from("VUDS\x01\x00\x00\x00", "latin1"), r.bytes(r.int(64))])
        : r.bytes(r.int(256));
    d.body = le().u32(8 + data.length).u32(data.length).bytes(data).buf;
  } else if (cmd < 39) {
    d.command = Command.MIG_GET_PRECOPY_INFO;
    d.body = le().u32(24).u32(0).buf;
  } else {
    d.command = r.chance(0.5) ? Command.DMA_READ : Command.DMA_WRITE;
    d.body = le().u64(r.int(1 << 20)).u64(4).bytes(d.command === Command.DMA_WRITE ? 4 : 0).buf;
  }
  return d;
}

/**
 * The start of a stream for the device (a valid preamble and HEADER, for edu
 * or bigmem) and then a record whose header lies: a MEMORY or STATE record
 * declaring more than any limit, a MEMORY offset outside device memory, a
 * length that is not whole pages, or a CRC that does not match; then a few
 * bytes of its payload, or all of it when it is small. What the server must
 * refuse from the header alone without buffering, and what it must reset
 * after writing.
 */
function lyingStream(r: Rng): Buffer {
  const w = new StateStreamWriter();
  w.header({ deviceType: r.chance(0.5) ? "edu" : "bigmem", deviceVersion: r.int(3), configSize: 4096 });
  const start = Buffer.from(w.read(1 << 16));
  const kind = r.chance(0.7) ? RecordKind.MEMORY : r.chance(0.8) ? RecordKind.STATE : r.int(8);
  const lengths = [0, 7, 8, 8 + 4096, 8 + 4095, 8 + (1 << 20), (1 << 20) + 1, 0x7fff_ffff, 0xffff_ffff, 8 + (9 << 20), r.int(1 << 24)];
  const length = pick(r, lengths);
  const head = le().u8(kind).u32(length).buf;
  const body = kind === RecordKind.MEMORY ? le().u64(pick(r, [0n, 4096n, 1n, 1n << 40n, 0xffff_ffff_ffff_f000n])).buf : Buffer.alloc(0);
  const payloadLeft = Math.max(0, length - body.length);
  const sent = Math.min(payloadLeft, r.chance(0.5) ? r.int(64) : 8192);
  const tail = sent === payloadLeft ? le().u32(r.int(0x1_0000_0000)).buf : Buffer.alloc(0); // a CRC that almost never matches
  return Buffer.concat([r.chance(0.8) ? start : Buffer.alloc(0), head, body, r.bytes(sent), tail]);
}

/** Applies one mutation: mostly ones that keep the framing, now and then one that breaks it. */
function mutate(r: Rng, d: Draft): void {
  const body = d.body;
  if (r.chance(0.04)) {
    // framing breakers: the server must drop the connection (or wait for bytes that never come)
    switch (r.int(4)) {
      case 0:
        // not a framing fault any more: answered with ENOSYS, the session goes on
        d.command = pick(r, UNKNOWN_COMMANDS);
        d.tag += "+badcmd";
        return;
      case 1: {
        const honest = HEADER_SIZE + body.length;
        d.size = pick(r, [0, 1, 15, honest - 1, honest + 1, honest + r.range(2, 64), honest + 4096, 0x8000_0000, 0xffff_ffff, Math.max(16, honest - r.range(1, 16))]);
        d.tag += "+size";
        return;
      }
      case 2:
        d.flags = (d.flags & ~HeaderFlags.TYPE_MASK) | r.range(2, 15);
        d.tag += "+type";
        return;
      default:
        d.raw = r.bytes(r.range(1, 80));
        d.tag += "+random";
        return;
    }
  }
  switch (r.int(12)) {
    case 0:
    case 1: {
      if (body.length === 0) return;
      const b = Buffer.from(body);
      for (let i = r.range(1, 8); i > 0; i--) b[r.int(b.length)]! ^= 1 << r.int(8);
      d.body = b;
      d.tag += "+flip";
      return;
    }
    case 2:
    case 3:
    case 4: {
      if (body.length < 4) return;
      const b = Buffer.from(body);
      if (b.length >= 8 && r.chance(0.4)) {
        const at = 8 * r.int(Math.floor(b.length / 8));
        b.writeBigUInt64LE(pick(r, U64_BOUNDS), at);
      } else {
        const at = 4 * r.int(Math.floor(b.length / 4));
        b.writeUInt32LE(pick(r, U32_BOUNDS), at);
      }
      d.body = b;
      d.tag += "+bound";
      return;
    }
    case 5: {
      const k = r.int(4);
      if (k === 0) d.body = Buffer.concat([body, r.bytes(r.range(1, 64))]);
      else if (k === 1) d.body = body.subarray(0, r.int(body.length + 1));
      else if (k === 2) d.body = Buffer.alloc(0);
      else d.body = body.subarray(0, Math.max(0, body.length - r.range(1, 8)));
      d.tag += "+len";
      return;
    }
    case 6:
      // another command's body under this header
      d.command = pick(r, KNOWN_COMMANDS);
      d.tag += "+cmd";
      return;
    case 7: {
      const k = r.int(4);
      if (k === 0) d.flags |= HeaderFlags.NO_REPLY;
      else if (k === 1) d.flags = (d.flags & ~HeaderFlags.TYPE_MASK) | HeaderFlags.TYPE_REPLY;
      else if (k === 2) d.flags |= HeaderFlags.ERROR;
      else d.flags = (d.flags | (r.u32() & ~0x3f)) >>> 0;
      d.tag += "+flags";
      return;
    }
    case 8:
      d.error = pick(r, U32_BOUNDS);
      d.tag += "+err";
      return;
    case 9:
    case 10:
      for (let i = r.range(1, 3); i > 0; i--) d.fds.push(r.chance(0.5) ? "memfd" : r.chance(0.8) ? "eventfd" : "eventfd-full");
      d.tag += "+fds";
      return;
    default:
      if (r.chance(0.2)) {
        d.body = Buffer.concat([body.subarray(0, 16), r.bytes(r.range(16_000, 60_000))]);
        d.tag += "+big";
      }
  }
}

// ------------------------------------------------------------------ the run

export interface FuzzOptions {
  seed: number;
  /** Stop after this many messages (Infinity: only the time limit). */
  messages: number;
  /** Stop after this long (ms). */
  timeLimitMs?: number;
  /** Health probe (and RSS / fd sample) every this many messages. */
  probeEvery?: number;
  /** A missing reply or probe answer after this long is a hang. */
  hangMs?: number;
  device?: string;
  deviceOpts?: string[];
  maxDmaMaps?: number;
  /** Check at every probe that the server's fds are back to the start; a difference is a failure ("leak"). */
  strictFds?: boolean;
  log?: (line: string) => void;
}

export interface FuzzResult {
  seed: number;
  messages: number;
  connections: number;
  replies: number;
  errorReplies: number;
  /** Connections the server closed (frame faults, or our fault followed by EOF). */
  serverCloses: number;
  /** Server-to-client DMA requests answered (some badly). */
  dmaRequests: number;
  probes: number;
  /** New connections refused because the server still held the previous one (retried). */
  refused: number;
  crashes: number;
  hangs: number;
  /** Probes that found server fds above the start (with strictFds). */
  leaks: number;
  /** Human-readable failures, each with seed and message index. */
  failures: string[];
  /** RSS, for the summary line only (it measures the allocator as much as the server). */
  rssStart: number;
  rssEnd: number;
  rssMax: number;
  /** V8 heap in use, external memory and ArrayBuffer memory after a full GC, at the start and at the end. */
  heapStart: number;
  heapEnd: number;
  externalStart: number;
  externalEnd: number;
  arrayBuffersStart: number;
  arrayBuffersEnd: number;
  /** The server's accounting at the end (maxima over every connection of the run), or null if it was gone. */
  stats: ServerStats | null;
  fdsStart: number;
  fdsEnd: number;
  fdsMax: number;
  /** What the server's fds point to at the end, when they did not come back (target -> count). */
  fdsLeftOver: Record<string, number>;
  ms: number;
}

class Failure extends Error {}

const EVENTFD_FULL = Buffer.from([0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);

/** A blocking eventfd whose counter is at its maximum: a server that writes it blocking hangs. */
function fullEventfd(): number {
  const fd = native.eventfd(0, 0);
  native.setNonblocking(fd, false);
  writeSync(fd, EVENTFD_FULL);
  return fd;
}

/** Whether a process is running or sleeping, and its CPU time so far (to tell a busy loop from a stuck wait). */
function cpuState(pid: number): string {
  try {
    const f = readFileSync(`/proc/${pid}/stat`, "latin1").split(") ")[1]!.split(" ");
    return `state ${f[0]}, utime ${f[11]} stime ${f[12]} ticks`;
  } catch {
    return "gone";
  }
}

interface Sent {
  index: number;
  tag: string;
  head: string;
}

export async function runFuzz(opts: FuzzOptions): Promise<FuzzResult> {
  const log = opts.log ?? ((l: string) => console.error(l));
  const r = new Rng(opts.seed);
  const probeEvery = opts.probeEvery ?? 2000;
  const hangMs = opts.hangMs ?? 5000;
  const deadline = opts.timeLimitMs !== undefined ? Date.now() + opts.timeLimitMs : Infinity;
  const server = await ChildServer.start({ device: opts.device, deviceOpts: opts.deviceOpts, maxDmaMaps: opts.maxDmaMaps ?? 64 });
  const res: FuzzResult = {
    seed: opts.seed,
    messages: 0,
    connections: 0,
    replies: 0,
    errorReplies: 0,
    serverCloses: 0,
    dmaRequests: 0,
    probes: 0,
    refused: 0,
    crashes: 0,
    hangs: 0,
    leaks: 0,
    failures: [],
    rssStart: 0,
    rssEnd: 0,
    rssMax: 0,
    heapStart: 0,
    heapEnd: 0,
    externalStart: 0,
    externalEnd: 0,
    arrayBuffersStart: 0,
    arrayBuffersEnd: 0,
    stats: null,
    fdsStart: 0,
    fdsEnd: 0,
    fdsMax: 0,
    fdsLeftOver: {},
    ms: 0,
  };
  let startTargets: string[] = [];
  const recent: Sent[] = [];
  const t0 = Date.now();
  let c: RawClient | null = null;
  /** msgIds we expect replies to, in send order. */
  let outstanding: number[] = [];
  /** Which message a msgId was last used for (for reports). */
  const idIndex = new Map<number, number>();
  let nextId = 1;

  const where = (index: number): string => `seed ${opts.seed}, message #${index}`;
  const context = (): string => recent.map((s) => `    #${s.index} ${s.tag} ${s.head}`).join("\n");
  const fail = (kind: "crash" | "hang" | "leak", index: number, what: string): never => {
    if (kind === "crash") res.crashes++;
    else if (kind === "hang") res.hangs++;
    else res.leaks++;
    const msg = `${kind.toUpperCase()} at ${where(index)}: ${what}${kind === "hang" ? `; server ${cpuState(server.pid)}` : ""}\n  last messages:\n${context()}`;
    res.failures.push(msg);
    throw new Failure(msg);
  };
  const checkAlive = (index: number): void => {
    if (server.exited) fail("crash", index, `server exited (code ${server.exitCode}, signal ${server.exitSignal}); stderr: ${server.stderrTail.slice(-1500)}`);
  };

  const answerDma = (client: RawClient) => (f: Frame): void => {
    res.dmaRequests++;
    const h = f.header;
    const reply = (body: Buffer, flags: number = HeaderFlags.TYPE_REPLY, error = 0, msgId = h.msgId): void => {
      if (!client.closed) client.sendRaw(frameBytes({ msgId, command: h.command, flags, error }, body));
    };
    const k = r.int(10);
    if (k === 0) return; // never answered: the server times the request out
    if (k === 1) return reply(Buffer.alloc(0), HeaderFlags.TYPE_REPLY | HeaderFlags.ERROR, pick(r, [5, 14, 19, 22]));
    if (k === 2) return reply(r.bytes(r.int(40)), HeaderFlags.TYPE_REPLY, 0, (h.msgId + 1) & 0xffff);
    if (k === 3) return reply(r.bytes(r.int(40)));
    if (h.command === Command.DMA_READ && f.body.length >= 16) {
      const count = Number(f.body.readBigUInt64LE(8) & 0xfffffn);
      reply(Buffer.concat([f.body.subarray(0, 16), r.bytes(count)]));
    } else {
      reply(Buffer.alloc(0));
    }
  };

  /** Drops our connection and waits until the server has let go of it (a probe would be refused otherwise). */
  const drop = async (): Promise<void> => {
    if (c) {
      c.close();
      c = null;
    }
    outstanding = [];
  };

  /** A new fuzzing connection; usually with a good VERSION first. */
  const connect = async (index: number): Promise<RawClient> => {
    for (let attempt = 0; ; attempt++) {
      checkAlive(index);
      const x = RawClient.connect(server.socketPath);
      res.connections++;
      x.onServerRequest = answerDma(x);
      if (r.chance(0.05)) return x; // sometimes no VERSION at all
      const id = x.send(Command.VERSION, versionBody({ capabilities: { max_msg_fds: 16, max_data_xfer_size: r.chance(0.5) ? 1 << 20 : 65536 } }), { msgId: 0 });
      try {
        await x.reply(id, hangMs);
        // guest memory at [0, 1 MiB) for the device's DMA: over the socket, in a memfd, or none
        const how = r.int(10);
        if (how < 7) {
          const fd = how < 3 ? native.memfdCreate("fuzz", 1n << 20n) : -1;
          const m = x.send(Command.DMA_MAP, le().u32(32).u32(DmaMapFlags.READ | DmaMapFlags.WRITE).u64(0).u64(0).u64(1 << 20).buf, { msgId: 0, fds: fd >= 0 ? [fd] : undefined });
          if (fd >= 0) native.close(fd);
          await x.reply(m, hangMs);
        }
        return x;
      } catch (err) {
        checkAlive(index);
        if (!x.closed) fail("hang", index, `no VERSION reply within ${hangMs} ms on a new connection`);
        // refused: the server still holds the previous connection
        res.refused++;
        if (attempt > 2000) fail("hang", index, "the server keeps refusing new connections");
        await sleep(attempt < 10 ? 1 : 5);
      }
    }
  };

  /** Waits for every outstanding reply (or the server closing on us). */
  const settle = async (index: number): Promise<void> => {
    if (!c || outstanding.length === 0) return;
    const client = c;
    const ids = outstanding;
    outstanding = [];
    try {
      await client.until(() => client.closed || ids.every((id) => client.hasReply(id)), hangMs, "replies");
    } catch {
      checkAlive(index);
      const missing = ids.filter((id) => !client.hasReply(id));
      fail("hang", index, `${missing.length} of ${ids.length} replies missing after ${hangMs} ms (msgIds ${missing.map((id) => `0x${id.toString(16)} of #${idIndex.get(id)}`).join(", ")})`);
    }
    for (const id of ids) {
      if (!client.hasReply(id)) continue;
      const f = await client.reply(id, 1);
      res.replies++;
      if (f.header.error !== 0) res.errorReplies++;
    }
    if (client.closed) {
      res.serverCloses++;
      c = null;
    }
  };

  /**
   * A round trip on the fuzzing connection: everything sent before it has
   * left our send queue and been read by the server (closing a connection
   * drops what our transport still queues, which would cut a frame short).
   */
  const sync = async (index: number): Promise<void> => {
    if (!c || c.closed) return;
    const client = c;
    const id = client.send(Command.DEVICE_GET_INFO, le().u32(16).u32(0).u32(0).u32(0).buf, { msgId: 0xfffe });
    try {
      await client.reply(id, hangMs);
    } catch {
      checkAlive(index);
      if (!client.closed) fail("hang", index, `no reply to a sync request within ${hangMs} ms`);
    }
  };

  const probe = async (index: number): Promise<void> => {
    await sync(index);
    await drop();
    for (let attempt = 0; ; attempt++) {
      checkAlive(index);
      const p = RawClient.connect(server.socketPath);
      try {
        const v = await p.request(Command.VERSION, versionBody(), {}, hangMs);
        if (v.header.error !== 0) fail("hang", index, `probe: VERSION refused with errno ${v.header.error}`);
        const rd = await p.request(Command.REGION_READ, access(7, 0n, 2), {}, hangMs);
        if (rd.header.error !== 0 || rd.body.readUInt16LE(16) !== 0x1234) fail("hang", index, `probe: vendor id read failed (errno ${rd.header.error})`);
        res.probes++;
        return;
      } catch (err) {
        if (err instanceof Failure) throw err;
        checkAlive(index);
        if (!p.closed) fail("hang", index, `probe: no answer within ${hangMs} ms`);
        if (attempt > 2000) fail("hang", index, "probe: the server keeps refusing new connections");
        await sleep(attempt < 10 ? 1 : 5);
      } finally {
        p.close();
      }
    }
  };

  const sample = (): void => {
    const rss = server.rss();
    const fds = server.fds();
    if (rss > res.rssMax) res.rssMax = rss;
    if (fds > res.fdsMax) res.fdsMax = fds;
  };

  /** Fds to attach: made now, closed by us right after the send (the server has its copies). */
  const makeFds = (d: Draft): number[] =>
    d.fds.map((k) => (k === "memfd" ? native.memfdCreate("fuzz", d.memfdSize) : k === "eventfd" ? native.eventfd(0, 0) : fullEventfd()));

  try {
    await probe(0);
    await sleep(50);
    res.fdsStart = server.fds();
    startTargets = server.fdTargets();
    const g0 = await server.gcStats();
    res.rssStart = g0.rss;
    res.heapStart = g0.heapUsed;
    res.externalStart = g0.external;
    res.arrayBuffersStart = g0.arrayBuffers;
    res.rssMax = res.rssStart;
    res.fdsMax = res.fdsStart;

    let i = 0;
    // bursts advance i by several messages at once: probe whenever i has passed the next multiple
    let nextProbe = probeEvery;
    let lastReport = Date.now();
    while (i < opts.messages && Date.now() < deadline) {
      if (i >= nextProbe) {
        nextProbe += probeEvery * Math.floor((i - nextProbe) / probeEvery + 1);
        await settle(i);
        await probe(i);
        sample();
        if (opts.strictFds && !(await eventually(() => server.fds() === res.fdsStart, 1000))) {
          const left = server.fdTargets();
          for (const t of startTargets) left.splice(left.indexOf(t), 1);
          fail("leak", i, `server fds ${res.fdsStart} -> ${server.fds()}: ${left.join(", ")}`);
        }
        if (Date.now() - lastReport > 10_000) {
          lastReport = Date.now();
          const secs = (Date.now() - t0) / 1000;
          log(`  ${i} messages, ${Math.round(i / secs)}/s, ${res.connections} connections, server RSS ${(server.rss() / 1048576).toFixed(1)} MiB, fds ${server.fds()}`);
        }
      }
      if (!c) c = await connect(i);

      // a burst of messages, sometimes several in one send
      const burst = r.chance(0.1) ? r.range(2, 6) : 1;
      const frames: Buffer[] = [];
      const fdsOut: number[] = [];
      let breaksFraming = false;
      /** msgIds of this burst that must be answered. */
      const burstIds: number[] = [];
      for (let k = 0; k < burst && i < opts.messages; k++, i++) {
        const d = template(r);
        d.tag = NAMES.get(d.command) ?? String(d.command);
        if (!r.chance(0.3)) for (let m = r.range(1, 3); m > 0; m--) mutate(r, d);
        let msgId = nextId;
        nextId = nextId >= 0xfffd ? 1 : nextId + 1; // 0 (VERSION) and 0xfffe (sync) stay ours
        if (r.chance(0.02)) msgId = 0xffff;
        const frame = d.raw ?? Buffer.concat([encodeHeader({ msgId, command: d.command, size: d.size ?? HEADER_SIZE + d.body.length, flags: d.flags >>> 0, error: d.error } satisfies Header), d.body]);
        recent.push({ index: i, tag: d.tag + (d.fds.length ? `[fds ${d.fds.join(",")}]` : ""), head: frame.subarray(0, 96).toString("hex") + (frame.length > 96 ? `...(${frame.length} bytes)` : "") });
        if (recent.length > (opts.strictFds ? Math.min(probeEvery, 64) : 8)) recent.shift();
        frames.push(frame);
        fdsOut.push(...makeFds(d));
        res.messages++;
        const honest = d.raw === undefined && d.size === undefined;
        d.flags >>>= 0;
        const type = d.flags & HeaderFlags.TYPE_MASK;
        if (!honest || (type !== HeaderFlags.TYPE_COMMAND && type !== HeaderFlags.TYPE_REPLY)) {
          breaksFraming = true;
          i++;
          break;
        }
        idIndex.set(msgId, i);
        if (type === HeaderFlags.TYPE_COMMAND && (d.flags & HeaderFlags.NO_REPLY) === 0 && !outstanding.includes(msgId) && !burstIds.includes(msgId)) burstIds.push(msgId);
      }
      const bytes = Buffer.concat(frames);
      // split at random points; fds ride on a random piece
      const cuts = r.chance(0.3) ? Array.from({ length: r.range(1, 3) }, () => r.int(bytes.length)).sort((a, b) => a - b) : [];
      const pieces: Buffer[] = [];
      let at = 0;
      for (const cut of cuts) {
        if (cut > at) pieces.push(bytes.subarray(at, cut));
        at = Math.max(at, cut);
      }
      if (at < bytes.length) pieces.push(bytes.subarray(at));
      const fdPiece = fdsOut.length > 0 ? r.int(pieces.length) : -1;
      outstanding.push(...burstIds);
      for (let p = 0; p < pieces.length; p++) {
        if (c.closed) break;
        c.sendRaw(pieces[p]!, p === fdPiece ? fdsOut : undefined);
      }
      for (const fd of fdsOut) native.close(fd);

      if (breaksFraming) {
        // the stream is beyond repair for us: sometimes let the server see more, then go
        if (r.chance(0.3) && !c.closed) c.sendRaw(r.bytes(r.range(1, 64)));
        outstanding = [];
        if (r.chance(0.2)) await sleep(0);
        if (c.closed) res.serverCloses++;
        await drop();
      } else if (c.closed) {
        await settle(i);
        c = null;
      } else if (outstanding.length >= 16 || r.chance(0.1)) {
        await settle(i);
      }
      checkAlive(i);
    }
    await settle(i);
    await probe(i);
    sample();
  } catch (err) {
    if (!(err instanceof Failure)) throw err;
  } finally {
    await drop();
    if (!server.exited) {
      // let the last connection go, then measure
      await sleep(200);
      res.fdsEnd = server.fds();
      if (res.fdsEnd !== res.fdsStart) {
        const left = server.fdTargets();
        for (const t of startTargets) left.splice(left.indexOf(t), 1);
        for (const t of left) {
          const k = t.replace(/\d+/g, "N");
          res.fdsLeftOver[k] = (res.fdsLeftOver[k] ?? 0) + 1;
        }
      }
      try {
        const g1 = await server.gcStats();
        res.rssEnd = g1.rss;
        res.heapEnd = g1.heapUsed;
        res.externalEnd = g1.external;
        res.arrayBuffersEnd = g1.arrayBuffers;
        res.stats = await server.serverStats();
      } catch (err) {
        // a server that does not answer its control channel is stuck: a hang (once)
        if (res.hangs === 0) {
          res.hangs++;
          res.failures.push(`HANG at the end (seed ${opts.seed}): the server did not answer gc/stats: ${(err as Error).message}`);
        }
      }
    }
    res.ms = Date.now() - t0;
    await server.stop();
  }
  return res;
}

export function summary(r: FuzzResult): string {
  const mib = (b: number): string => (b / 1048576).toFixed(1);
  return (
    `fuzz: seed ${r.seed}, messages ${r.messages}, connections ${r.connections}, crashes ${r.crashes}, hangs ${r.hangs}, ` +
    `V8 heap ${mib(r.heapStart)} -> ${mib(r.heapEnd)} MiB, external ${mib(r.externalStart)} -> ${mib(r.externalEnd)} MiB, arrayBuffers ${mib(r.arrayBuffersStart)} -> ${mib(r.arrayBuffersEnd)} MiB, ` +
    `server stats ${JSON.stringify(r.stats)}, RSS start ${mib(r.rssStart)} MiB end ${mib(r.rssEnd)} MiB (max ${mib(r.rssMax)}, not judged), fds start ${r.fdsStart} end ${r.fdsEnd} (max ${r.fdsMax}), ` +
    (r.fdsEnd !== r.fdsStart ? `fds left over ${JSON.stringify(r.fdsLeftOver)}, ` : "") +
    `replies ${r.replies} (errors ${r.errorReplies}), server closes ${r.serverCloses}, DMA requests ${r.dmaRequests}, probes ${r.probes}, refused ${r.refused}, ` +
    `${(r.ms / 1000).toFixed(1)} s, ${Math.round((r.messages * 1000) / Math.max(1, r.ms))} msg/s`
  );
}

/**
 * A/B helper for hot-path work, not part of `npm run bench`: the server's
 * per-message cost without the scheduler noise of a round trip. One process,
 * the edu device, a real Connection; requests are pushed into it as the
 * transport would deliver them (chunks of ready frames) and replies go out
 * through a real UnixConnection (sendmsg on a connected socket whose peer
 * this script drains), so napi and syscall costs are counted.
 *
 *   npx tsx test/bench/hotpath.ts [ROUNDS] [--no-io]
 *
 * --no-io: replies are handed to the addon's send on fd -1 (EBADF at once):
 * the napi and syscall-entry cost stays, the socket and its noise go.
 * HOTPATH_BATCH=N: frames per delivered chunk (default 64; 1 is the shape of
 * a round trip, one message per read).
 *
 * Prints ns per message for REGION_READ, REGION_WRITE and posted REGION_WRITE,
 * median of ROUNDS (default 7) rounds of 200k messages.
 */
import { mkdtempSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { eduFactory } from "../../devices/edu/edu.ts";
import { Command, HeaderFlags } from "../../protocol/constants.ts";
import { silentLogger } from "../../src/log.ts";
import { VfioUserServer } from "../../src/server/server.ts";
import { native } from "../../src/transport/native.ts";
import { UnixConnection, UnixServer } from "../../src/transport/unix-socket.ts";
import type { Transport, TransportHandlers } from "../../src/transport/types.ts";

const rounds = Number(process.argv.slice(2).find((a) => /^\d+$/.test(a)) ?? 7);
const noIo = process.argv.includes("--no-io");
const PER_ROUND = 200_000;
const BATCH = Number(process.env.HOTPATH_BATCH ?? 64);

const dir = mkdtempSync(path.join(os.tmpdir(), "hotpath-"));
const sockPath = path.join(dir, "s");
let accepted: UnixConnection | null = null;
const listener = UnixServer.listen(sockPath, { onConnection: (c) => (accepted = c) });
const peerFd = native.connect(sockPath);
while (accepted === null) await new Promise((r) => setImmediate(r));
listener.close();
const out: UnixConnection = accepted;

/** The transport the Connection sees: data is injected, replies go to `out`. */
class Injected implements Transport {
  handlers: TransportHandlers | null = null;
  readonly peer = "hotpath";
  closed = false;
  readonly congested = false;
  start(h: TransportHandlers): void {
    this.handlers = h;
  }
  send(buffers: readonly Uint8Array[], fds?: readonly number[]): void {
    if (noIo) native.send(-1, buffers, null);
    else out.send(buffers, fds);
  }
  close(): void {
    this.closed = true;
  }
}

const transport = new Injected();
const server = new VfioUserServer({ device: eduFactory.create({}), log: silentLogger() });
server.accept(transport);

const drainBuf = Buffer.allocUnsafe(1 << 20);
const fdsOut = new Int32Array(1 + native.MAX_FDS);
function drain(): void {
  while (native.recv(peerFd, drainBuf, fdsOut) > 0) {
    // replies are dropped
  }
}

function frame(id: number, command: number, flags: number, body: Buffer): Buffer {
  const b = Buffer.alloc(16 + body.length);
  b.writeUInt16LE(id, 0);
  b.writeUInt16LE(command, 2);
  b.writeUInt32LE(16 + body.length, 4);
  b.writeUInt32LE(flags, 8);
  body.copy(b, 16);
  return b;
}

const json = Buffer.from('{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":1048576}}\0');
const ver = Buffer.alloc(4 + json.length);
json.copy(ver, 4);
transport.handlers!.data(frame(0, Command.VERSION, 0, ver), []);
drain();

function access(data: number | null): Buffer {
  const b = Buffer.alloc(16 + (data === null ? 0 : 4));
  b.writeBigUInt64LE(4n, 0);
  b.writeUInt32LE(0, 8);
  b.writeUInt32LE(4, 12);
  if (data !== null) b.writeUInt32LE(data, 16);
  return b;
}

/** BATCH frames in one chunk, like one recvmsg of a busy socket. */
function batch(command: number, flags: number, body: Buffer): Buffer {
  const parts: Buffer[] = [];
  for (let i = 0; i < BATCH; i++) parts.push(frame(i, command, flags, body));
  return Buffer.concat(parts);
}

const cases: [string, Buffer][] = [
  ["REGION_READ", batch(Command.REGION_READ, 0, access(null))],
  ["REGION_WRITE", batch(Command.REGION_WRITE, 0, access(0x1234))],
  ["REGION_WRITE posted", batch(Command.REGION_WRITE, HeaderFlags.NO_REPLY, access(0x1234))],
];

function run(chunk: Buffer): number {
  const h = transport.handlers!;
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < PER_ROUND / BATCH; i++) {
    // the transport hands over a fresh copy per read
    const c = Buffer.allocUnsafe(chunk.length);
    chunk.copy(c);
    h.data(c, []);
    if ((i & 15) === 15) drain();
  }
  const ns = Number(process.hrtime.bigint() - t0);
  drain();
  return ns / PER_ROUND;
}

/** The floor: what the echo server does per message (one sendmsg of a 32-byte reply). */
function floor(): number {
  const reply = [Buffer.alloc(32)];
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < PER_ROUND; i++) {
    if (noIo) native.send(-1, reply, null);
    else out.send(reply);
    if ((i & 1023) === 1023) drain();
  }
  const ns = Number(process.hrtime.bigint() - t0);
  drain();
  return ns / PER_ROUND;
}

const results = new Map<string, number[]>([["floor: 1 sendmsg", []]]);
for (const [, chunk] of cases) run(chunk); // warm-up
floor();
for (let r = 0; r < rounds; r++) {
  results.get("floor: 1 sendmsg")!.push(floor());
  for (const [name, chunk] of cases) {
    const list = results.get(name) ?? [];
    list.push(run(chunk));
    results.set(name, list);
  }
}
for (const [name, list] of results) {
  list.sort((a, b) => a - b);
  console.log(`${name.padEnd(22)} ${list[list.length >> 1]!.toFixed(0).padStart(6)} ns/msg  (min ${list[0]!.toFixed(0)})`);
}
server.close();
out.close();
native.close(peerFd);
rmSync(dir, { recursive: true, force: true });

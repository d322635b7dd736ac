/**
 * The floor: a bare server over the same native transport as the real one
 * (UnixServer / UnixConnection, src/transport/unix-socket.ts) and nothing
 * else: no frame decoder, no dispatch, no device, no logger.
 *
 * - Every message is returned to the sender as it came, with its type set
 *   to Reply (the 16+16-byte latency baseline: same request as a
 *   REGION_READ, a reply of the same size).
 * - A message with No_reply gets nothing (posted-write baseline).
 * - A MIG_DATA_READ (command 17) is answered like the real one, with the
 *   next `size` bytes of a 256 MiB buffer filled with a pattern at start-up
 *   (so the bytes come from memory, as device memory does): argsz u32,
 *   size u32, data. The raw socket-copy baseline for MIG_DATA_READ; the
 *   server sends.
 *
 *   node --import tsx test/bench/echo-server.ts SOCKET
 *
 * Prints "listening" on stdout once the socket accepts connections.
 */
import { UnixServer, type UnixConnection } from "../../src/transport/unix-socket.ts";
import { native } from "../../src/transport/native.ts";

const HEADER = 16;
const NO_REPLY = 0x10;
const MIG_DATA_READ = 17;
const SOURCE = Buffer.allocUnsafeSlow(256 << 20);
{
  const words = new Uint32Array(SOURCE.buffer, SOURCE.byteOffset, SOURCE.length / 4);
  let x = 0x9e3779b9;
  for (let i = 0; i < words.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    words[i] = x;
  }
}
let sourceAt = 0;

function serve(conn: UnixConnection): void {
  // A frame split across reads is assembled here (rare in these benchmarks).
  let carry: Buffer | null = null;
  const one: Buffer[] = [Buffer.alloc(0)];
  const migHead = Buffer.alloc(HEADER + 8);

  const frame = (buf: Buffer, at: number, size: number): void => {
    const flags = buf.readUInt32LE(at + 8);
    if ((flags & NO_REPLY) !== 0) return;
    if (buf.readUInt16LE(at + 2) === MIG_DATA_READ && size >= HEADER + 8) {
      const n = Math.min(buf.readUInt32LE(at + HEADER + 4), SOURCE.length);
      if (sourceAt + n > SOURCE.length) sourceAt = 0;
      migHead.set(buf.subarray(at, at + 4), 0); // msg id, command
      migHead.writeUInt32LE(HEADER + 8 + n, 4);
      migHead.writeUInt32LE(1, 8);
      migHead.writeUInt32LE(0, 12);
      migHead.writeUInt32LE(8 + n, 16);
      migHead.writeUInt32LE(n, 20);
      conn.send([migHead, SOURCE.subarray(sourceAt, sourceAt + n)]);
      sourceAt += n;
      return;
    }
    buf.writeUInt32LE((flags & ~0xf) | 1, at + 8); // the chunk is ours: reply in place
    one[0] = at === 0 && size === buf.length ? buf : buf.subarray(at, at + size);
    conn.send(one);
  };

  conn.start({
    data(chunk, fds) {
      for (const fd of fds) native.close(fd);
      let buf = chunk;
      if (carry !== null) {
        buf = Buffer.concat([carry, chunk]);
        carry = null;
      }
      let pos = 0;
      while (buf.length - pos >= HEADER) {
        const size = buf.readUInt32LE(pos + 4);
        if (size < HEADER) {
          conn.close();
          return;
        }
        if (buf.length - pos < size) break;
        frame(buf, pos, size);
        pos += size;
      }
      if (pos < buf.length) carry = buf.subarray(pos);
    },
    close() {},
  });
}

const socketPath = process.argv[2];
if (!socketPath) {
  console.error("usage: echo-server.ts SOCKET");
  process.exit(2);
}
const server = UnixServer.listen(socketPath, { onConnection: serve });
const stop = (): void => {
  server.close();
  process.exit(0);
};
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
console.log("listening");

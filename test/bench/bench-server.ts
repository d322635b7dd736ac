/**
 * The real server (VfioUserServer, the same object the CLI serves) with a
 * control channel on stdin, for the rows that need to reach inside it:
 *
 *   dirty RATIO SEED   mark RATIO of the pages of the running DMA log dirty,
 *                      through the server's own DirtyLog.markDirty (what the
 *                      DMA engine calls after each device write), spread
 *                      evenly from a seeded offset; replies {"dirtied":N}
 *   memcpy BYTES REPS  Buffer.copy of BYTES between two warm buffers in this
 *                      process, as one copy and as 1 MiB copies (the DMA
 *                      engine's chunk); replies {"one_gbps":G,"chunked_gbps":G}
 *                      (medians)
 *   idle               replies {"idle":true} once no client is connected
 *
 *   node --expose-gc --import tsx test/bench/bench-server.ts DEVICE SOCKET [KEY=VALUE...]
 *
 * Logs at warn, JSON, on stderr like `serve --log-level warn --log-format json`.
 * Prints {"listening":true} on stdout once the socket accepts connections.
 */
import { createInterface } from "node:readline";
import { findDevice } from "../../devices/index.ts";
import { createLogger } from "../../src/log.ts";
import { VfioUserServer } from "../../src/server/server.ts";

const [deviceName, socketPath, ...opts] = process.argv.slice(2);
const factory = deviceName ? findDevice(deviceName) : undefined;
if (!factory || !socketPath) {
  console.error("usage: bench-server.ts DEVICE SOCKET [KEY=VALUE...]");
  process.exit(2);
}
const options: Record<string, string> = {};
for (const o of opts) {
  const eq = o.indexOf("=");
  options[o.slice(0, eq)] = o.slice(eq + 1);
}
const server = new VfioUserServer({
  device: factory.create(options),
  log: createLogger({ level: "warn", pretty: false }),
});
server.listen(socketPath);

const reply = (value: unknown): void => {
  process.stdout.write(`${JSON.stringify(value)}\n`);
};

function dirty(ratio: number, seed: number): number {
  const log = server.endpoint.dirtyLog;
  if (!log) throw new Error("DMA logging is not started");
  let n = 0;
  for (const r of log.ranges) {
    const pages = Number(r.length / log.pageSize);
    const count = Math.round(pages * ratio);
    if (count === 0) continue;
    const stride = pages / count;
    const start = seed % Math.max(1, Math.floor(stride));
    for (let i = 0; i < count; i++) {
      const page = start + Math.floor(i * stride);
      log.markDirty(r.iova + BigInt(page) * log.pageSize, log.pageSize);
      n++;
    }
  }
  return n;
}

function memcpy(bytes: number, reps: number): { one_gbps: number; chunked_gbps: number } {
  const src = Buffer.alloc(bytes, 0x5a);
  const dst = Buffer.alloc(bytes, 0x00);
  const chunk = Math.min(bytes, 1 << 20);
  const shapes = {
    one: () => src.copy(dst),
    chunked: () => {
      for (let at = 0; at < bytes; at += chunk) src.copy(dst, at, at, Math.min(bytes, at + chunk));
    },
  };
  const out = { one_gbps: 0, chunked_gbps: 0 };
  for (const [name, copy] of Object.entries(shapes)) {
    copy(); // warm both buffers
    const times: number[] = [];
    for (let i = 0; i < reps; i++) {
      src[i] = i;
      const t0 = process.hrtime.bigint();
      copy();
      times.push(Number(process.hrtime.bigint() - t0));
    }
    times.sort((a, b) => a - b);
    out[`${name}_gbps` as keyof typeof out] = bytes / times[times.length >> 1]!;
  }
  return out;
}

async function idle(): Promise<void> {
  while (server.connection !== null) await new Promise((r) => setTimeout(r, 2));
}

const rl = createInterface({ input: process.stdin });
rl.on("line", (line) => {
  const [cmd, a, b] = line.trim().split(/\s+/);
  try {
    if (cmd === "dirty") {
      const dirtied = dirty(Number(a), Number(b ?? 0));
      // the fill's garbage (bigint addresses) is collected now, not inside the timed REPORT
      (globalThis as { gc?: () => void }).gc?.();
      reply({ dirtied });
    }
    else if (cmd === "memcpy") reply(memcpy(Number(a), Number(b ?? 9)));
    else if (cmd === "idle") void idle().then(() => reply({ idle: true }));
    else reply({ error: `unknown command ${cmd}` });
  } catch (err) {
    reply({ error: (err as Error).message });
  }
});
rl.on("close", () => {
  server.close();
  process.exit(0);
});
const stop = (): void => {
  server.close();
  process.exit(0);
};
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
reply({ listening: true });

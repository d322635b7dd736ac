/**
 * A server process for the robustness tests and the fuzzer: one device on
 * one socket, limits from the command line, and a tiny control channel on
 * stdin, answered on stdout:
 * - "gc" runs a full GC and answers "GC <rss> <heapUsed> <external>
 *   <arrayBuffers>" (the V8 figures are what tests bound; RSS is only
 *   printed: it measures the allocator as much as the server);
 * - "stats" answers "STATS <decoderHighWater> <sendQueueHighWater>
 *   <resumeBufferHighWater>", the server's own accounting of what clients
 *   made it hold (VfioUserServer.stats(), maxima over all connections).
 * Prints "READY <pid>" once listening.
 * SIGTERM / SIGINT close the server and exit 0.
 *
 *   node --expose-gc --import tsx test/fuzz/server-child.ts --socket PATH
 *     [--device edu|bigmem] [--opt K=V]... [--max-dma-maps N]
 *     [--max-data-xfer-size N] [--log-level L] [--log-file FILE]
 */
import fs from "node:fs";
import { parseArgs } from "node:util";
import { findDevice } from "../../devices/index.ts";
import { createLogger, silentLogger } from "../../src/log.ts";
import { VfioUserServer } from "../../src/server/server.ts";
import type { ServerLimits } from "../../src/server/session.ts";

const { values } = parseArgs({
  options: {
    socket: { type: "string" },
    device: { type: "string", default: "edu" },
    opt: { type: "string", multiple: true },
    "max-dma-maps": { type: "string" },
    "max-data-xfer-size": { type: "string" },
    "log-level": { type: "string", default: "silent" },
    "log-file": { type: "string" },
  },
  strict: true,
});
if (!values.socket) throw new Error("--socket is required");
const factory = findDevice(values.device!);
if (!factory) throw new Error(`unknown device ${values.device}`);
const devOpts: Record<string, string> = {};
for (const o of values.opt ?? []) {
  const eq = o.indexOf("=");
  devOpts[o.slice(0, eq)] = o.slice(eq + 1);
}
const limits: Partial<ServerLimits> = {};
if (values["max-dma-maps"]) limits.maxDmaMaps = Number(values["max-dma-maps"]);
if (values["max-data-xfer-size"]) limits.maxDataXferSize = Number(values["max-data-xfer-size"]);

const level = values["log-level"]!;
const log =
  level === "silent"
    ? silentLogger()
    : createLogger({
        level: level as "info",
        pretty: false,
        destination: values["log-file"] ? fs.openSync(values["log-file"], "a") : 2,
      });
const server = new VfioUserServer({ device: factory.create(devOpts), log, limits });
server.listen(values.socket);

const stop = (): void => {
  server.close();
  process.exit(0);
};
process.on("SIGTERM", stop);
process.on("SIGINT", stop);

process.stdin.setEncoding("utf8");
let buf = "";
process.stdin.on("data", (s: string) => {
  buf += s;
  let nl;
  while ((nl = buf.indexOf("\n")) >= 0) {
    const cmd = buf.slice(0, nl).trim();
    buf = buf.slice(nl + 1);
    if (cmd === "gc") {
      const gc = (globalThis as { gc?: () => void }).gc;
      gc?.();
      gc?.();
      const m = process.memoryUsage();
      process.stdout.write(`GC ${m.rss} ${m.heapUsed} ${m.external} ${m.arrayBuffers}\n`);
    } else if (cmd === "stats") {
      const st = server.stats();
      process.stdout.write(`STATS ${st.decoderHighWater} ${st.sendQueueHighWater} ${st.resumeBufferHighWater}\n`);
    }
  }
});
// the parent going away (stdin EOF) ends us too
process.stdin.on("end", stop);
process.stdout.write(`READY ${process.pid}\n`);

/**
 * Leak check: connect / VERSION / DMA_MAP with a memfd / SET_IRQS with an
 * eventfd / a refused request carrying an fd / REGION_READ / disconnect,
 * over and over, against a server in a child process. Every 10th cycle ends
 * with a frame-level fault (the server closes) instead of a clean close.
 * The server's open fds must come back exactly to the baseline, and its
 * memory after a full GC (V8 heap, external memory, arrayBuffers) within
 * margins; its own accounting (decoder and send-queue high-water marks)
 * says what a connection made it hold. RSS is reported, not judged: it
 * climbs ~15 MiB over the first ~4,000 cycles (allocator and V8 page
 * high-water marks, not objects) and varies from run to run. The baseline
 * is taken after a warm-up (default 4,000 cycles).
 *
 *   npx tsx test/fuzz/leak.ts [--cycles N]
 */
import { parseArgs } from "node:util";
import { pathToFileURL } from "node:url";
import { Command, DmaMapFlags, HEADER_SIZE, IrqIndex, IrqSetFlags, RegionIndex } from "../../protocol/index.ts";
import { native } from "../../src/transport/native.ts";
import type { ServerStats } from "../../src/server/server.ts";
import { ChildServer, RawClient, eventfd, eventually, frameBytes, healthProbe, le, memfd, sleep, versionBody } from "../robustness/raw-client.ts";

export interface LeakResult {
  cycles: number;
  /** Connections refused because the previous one was not torn down yet (retried). */
  retries: number;
  fdsBaseline: number;
  fdsEnd: number;
  /** Reported only (see the header). */
  rssBaseline: number;
  rssEnd: number;
  /** V8 heap in use after a full GC. */
  heapBaseline: number;
  heapEnd: number;
  /** Memory outside the V8 heap held by JS objects (Buffers, mappings' ArrayBuffers). */
  externalBaseline: number;
  externalEnd: number;
  /** ArrayBuffer memory (Buffers) after a full GC. */
  arrayBuffersBaseline: number;
  arrayBuffersEnd: number;
  /** The server's accounting at the end (VfioUserServer.stats(), maxima over every connection). */
  stats: ServerStats;
  ms: number;
}

const MAP = le().u32(32).u32(DmaMapFlags.READ | DmaMapFlags.WRITE).u64(0).u64(0x100000).u64(1 << 20).buf;
const IRQ = le().u32(20).u32(IrqSetFlags.ACTION_TRIGGER | IrqSetFlags.DATA_EVENTFD).u32(IrqIndex.MSI).u32(0).u32(1).buf;
const READ = le().u64(0).u32(RegionIndex.CONFIG).u32(4).buf;
const VERSION_BODY = versionBody();

async function expectErrno(c: RawClient, cmd: number, body: Buffer, want: number, fds?: number[]): Promise<void> {
  const got = await c.errno(cmd, body, { fds });
  if (got !== want) throw new Error(`${cmd}: errno ${got}, expected ${want}`);
}

/** One cycle; returns false when the server refused us because the last client was still there. */
async function cycle(socketPath: string, i: number): Promise<boolean> {
  const c = RawClient.connect(socketPath);
  try {
    const v = await c.request(Command.VERSION, VERSION_BODY);
    if (v.header.error !== 0) throw new Error(`VERSION errno ${v.header.error}`);
  } catch (err) {
    if (c.closed) return false; // refused: one client at a time
    throw err;
  }
  const m = memfd("leak-cycle", 1n << 20n);
  const e = eventfd();
  const stray = eventfd();
  try {
    await expectErrno(c, Command.DMA_MAP, MAP, 0, [m]);
    await expectErrno(c, Command.DEVICE_SET_IRQS, IRQ, 0, [e]);
    await expectErrno(c, Command.REGION_READ, READ, 22, [stray]);
    await expectErrno(c, Command.REGION_READ, READ, 0);
  } finally {
    native.close(m);
    native.close(e);
    native.close(stray);
  }
  if (i % 10 === 9) {
    c.sendRaw(frameBytes({ msgId: 1, command: 0x7777, size: 4, flags: 0, error: 0 }));
    await c.waitClosed(5000);
  } else {
    c.close();
  }
  return true;
}

export interface LeakOptions {
  /** Cycles before the baseline is taken (JIT, heap sizing). */
  warmup?: number;
  onProgress?: (done: number) => void;
}

export async function runLeakCycles(s: ChildServer, cycles: number, opts: LeakOptions = {}): Promise<LeakResult> {
  const onProgress = opts.onProgress;
  // warm up (JIT, lazily allocated buffers), then settle
  let retries = 0;
  const run = async (n: number, report: boolean): Promise<void> => {
    for (let i = 0; i < n; ) {
      if (await cycle(s.socketPath, i)) {
        i++;
        if (report && onProgress && i % 1000 === 0) onProgress(i);
      } else {
        retries++;
        await sleep(1);
      }
    }
  };
  await run(opts.warmup ?? 4000, false);
  await settle(s);
  const fdsBaseline = s.fds();
  const before = await s.gcStats();
  const t0 = Date.now();
  await run(cycles, true);
  const ms = Date.now() - t0;
  await settle(s);
  // the fd count must come back exactly: give the server 3 s to close what it
  // closes asynchronously; whatever is left then is in fdsEnd, which callers judge
  await eventually(() => s.fds() === fdsBaseline, 3000);
  const fdsEnd = s.fds();
  const after = await s.gcStats();
  const stats = await s.serverStats();
  return {
    cycles,
    retries,
    fdsBaseline,
    fdsEnd,
    rssBaseline: before.rss,
    rssEnd: after.rss,
    heapBaseline: before.heapUsed,
    heapEnd: after.heapUsed,
    externalBaseline: before.external,
    externalEnd: after.external,
    arrayBuffersBaseline: before.arrayBuffers,
    arrayBuffersEnd: after.arrayBuffers,
    stats,
    ms,
  };
}

/** Waits until no client is attached: a probe succeeds and the fd count is stable. Throws if either never happens. */
async function settle(s: ChildServer): Promise<void> {
  for (let i = 0; ; i++) {
    try {
      await healthProbe(s.socketPath);
      break;
    } catch (err) {
      if (i >= 100) throw new Error(`leak: the server refused every probe for 1 s: ${(err as Error).message}`);
      await sleep(10);
    }
  }
  let last = -1;
  for (let i = 0; i < 100; i++) {
    await sleep(20);
    const n = s.fds();
    if (n === last) return;
    last = n;
  }
  throw new Error(`leak: the server's fd count did not settle within 2 s (last ${last})`);
}

/**
 * Margins, from the design, for any number of cycles:
 * - fds: exact (every fd a cycle sends is closed or released by its end);
 * - V8 heap used, external, arrayBuffers after GC: +1 MiB each. Nothing a
 *   cycle allocates should outlive it; measured +0.1 MiB heap and +0.0 MiB
 *   external per 2,000 cycles, so 1 MiB is ~500 bytes a cycle at 2,000 and
 *   still far below one leaked 1 MiB mapping's ArrayBuffer;
 * - decoder high water: at most the largest frame a cycle sends (the VERSION);
 * - send queue high water: at most one reply (LEAK_REPLY_MAX): the client reads
 *   each reply before its next request, so the socket always takes it.
 */
export const LEAK_MEMORY_MARGIN = 1 << 20;
/** Every reply a cycle asks for is smaller than this (the largest is VERSION's). */
export const LEAK_REPLY_MAX = 4096;

export function leakVerdicts(r: LeakResult): { ok: boolean; what: string }[] {
  const m = LEAK_MEMORY_MARGIN;
  return [
    { ok: r.fdsEnd === r.fdsBaseline, what: `server fds ${r.fdsBaseline} -> ${r.fdsEnd} (must be exact)` },
    { ok: r.heapEnd - r.heapBaseline < m, what: `V8 heap used grew ${r.heapEnd - r.heapBaseline} bytes (margin ${m})` },
    { ok: r.externalEnd - r.externalBaseline < m, what: `external memory grew ${r.externalEnd - r.externalBaseline} bytes (margin ${m})` },
    { ok: r.arrayBuffersEnd - r.arrayBuffersBaseline < m, what: `arrayBuffers grew ${r.arrayBuffersEnd - r.arrayBuffersBaseline} bytes (margin ${m})` },
    { ok: r.stats.decoderHighWater <= HEADER_SIZE + VERSION_BODY.length, what: `decoder high water ${r.stats.decoderHighWater} (at most the VERSION frame, ${HEADER_SIZE + VERSION_BODY.length})` },
    { ok: r.stats.sendQueueHighWater <= LEAK_REPLY_MAX, what: `send queue high water ${r.stats.sendQueueHighWater} (at most one reply, ${LEAK_REPLY_MAX})` },
  ];
}

export function formatLeak(r: LeakResult): string {
  const mib = (b: number): string => (b / 1048576).toFixed(1);
  const sign = (b: number): string => (b >= 0 ? "+" : "") + (b / 1048576).toFixed(2);
  return (
    `leak: ${r.cycles} cycles in ${(r.ms / 1000).toFixed(1)} s (${Math.round((r.cycles * 1000) / r.ms)}/s, ${r.retries} retries), ` +
    `fds ${r.fdsBaseline} -> ${r.fdsEnd}, ` +
    `V8 heap used ${mib(r.heapBaseline)} -> ${mib(r.heapEnd)} MiB (${sign(r.heapEnd - r.heapBaseline)}), external ${mib(r.externalBaseline)} -> ${mib(r.externalEnd)} MiB (${sign(r.externalEnd - r.externalBaseline)}), ` +
    `arrayBuffers ${sign(r.arrayBuffersEnd - r.arrayBuffersBaseline)} MiB, server stats ${JSON.stringify(r.stats)}, ` +
    `RSS ${mib(r.rssBaseline)} -> ${mib(r.rssEnd)} MiB (${sign(r.rssEnd - r.rssBaseline)} MiB, not judged)`
  );
}

async function main(): Promise<void> {
  const { values } = parseArgs({ options: { cycles: { type: "string", default: "10000" } }, strict: true });
  const cycles = Number(values.cycles);
  const s = await ChildServer.start();
  try {
    const r = await runLeakCycles(s, cycles, { onProgress: (n) => process.stderr.write(`  ${n} cycles, server fds ${s.fds()}, RSS ${(s.rss() / 1048576).toFixed(1)} MiB\n`) });
    console.log(formatLeak(r));
    const failed = leakVerdicts(r).filter((v) => !v.ok);
    for (const v of failed) console.error(`leak: ${v.what}`);
    if (failed.length > 0) process.exitCode = 1;
  } finally {
    await s.stop();
  }
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href) await main();

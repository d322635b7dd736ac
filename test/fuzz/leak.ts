/**
 * Leak check: connect / VERSION / DMA_MAP with a memfd / SET_IRQS with an
 * eventfd / a refused request carrying an fd / REGION_READ / disconnect,
 * over and over, against a server in a child process. Every 10th cycle ends
 * with a frame-level fault (the server closes) instead of a clean close.
 * The server's open fds must come back exactly to the baseline, and its
 * memory after a full GC (V8 heap, external memory, RSS) within margins.
 * The baseline is taken after a warm-up (default 4,000 cycles): RSS climbs
 * ~15 MiB over the first ~4,000 cycles (allocator and V8 page high-water
 * marks) and is flat from there (measured up to 20,000 cycles).
 *
 *   npx tsx test/fuzz/leak.ts [--cycles N]
 */
import { parseArgs } from "node:util";
import { pathToFileURL } from "node:url";
import { Command, DmaMapFlags, IrqIndex, IrqSetFlags, RegionIndex } from "../../protocol/index.ts";
import { native } from "../../src/transport/native.ts";
import { ChildServer, RawClient, eventfd, eventually, frameBytes, healthProbe, le, memfd, sleep, versionBody } from "../robustness/raw-client.ts";

export interface LeakResult {
  cycles: number;
  /** Connections refused because the previous one was not torn down yet (retried). */
  retries: number;
  fdsBaseline: number;
  fdsEnd: number;
  rssBaseline: number;
  rssEnd: number;
  /** V8 heap in use after a full GC. */
  heapBaseline: number;
  heapEnd: number;
  /** Memory outside the V8 heap held by JS objects (Buffers, mappings' ArrayBuffers). */
  externalBaseline: number;
  externalEnd: number;
  ms: number;
}

const MAP = le().u32(32).u32(DmaMapFlags.READ | DmaMapFlags.WRITE).u64(0).u64(0x100000).u64(1 << 20).buf;
const IRQ = le().u32(20).u32(IrqSetFlags.ACTION_TRIGGER | IrqSetFlags.DATA_EVENTFD).u32(IrqIndex.MSI).u32(0).u32(1).buf;
const READ = le().u64(0).u32(RegionIndex.CONFIG).u32(4).buf;

async function expectErrno(c: RawClient, cmd: number, body: Buffer, want: number, fds?: number[]): Promise<void> {
  const got = await c.errno(cmd, body, { fds });
  if (got !== want) throw new Error(`${cmd}: errno ${got}, expected ${want}`);
}

/** One cycle; returns false when the server refused us because the last client was still there. */
async function cycle(socketPath: string, i: number): Promise<boolean> {
  const c = RawClient.connect(socketPath);
  try {
    const v = await c.request(Command.VERSION, versionBody());
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
  // the fd count must come back exactly
  await eventually(() => s.fds() === fdsBaseline, 3000);
  const fdsEnd = s.fds();
  const after = await s.gcStats();
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
    ms,
  };
}

/** Waits until no client is attached: a probe succeeds and the fd count is stable. */
async function settle(s: ChildServer): Promise<void> {
  for (let i = 0; i < 100; i++) {
    try {
      await healthProbe(s.socketPath);
      break;
    } catch {
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
}

export function formatLeak(r: LeakResult): string {
  const mib = (b: number): string => (b / 1048576).toFixed(1);
  const sign = (b: number): string => (b >= 0 ? "+" : "") + (b / 1048576).toFixed(2);
  return (
    `leak: ${r.cycles} cycles in ${(r.ms / 1000).toFixed(1)} s (${Math.round((r.cycles * 1000) / r.ms)}/s, ${r.retries} retries), ` +
    `fds ${r.fdsBaseline} -> ${r.fdsEnd}, RSS ${mib(r.rssBaseline)} -> ${mib(r.rssEnd)} MiB (${sign(r.rssEnd - r.rssBaseline)} MiB), ` +
    `V8 heap used ${mib(r.heapBaseline)} -> ${mib(r.heapEnd)} MiB (${sign(r.heapEnd - r.heapBaseline)}), external ${mib(r.externalBaseline)} -> ${mib(r.externalEnd)} MiB (${sign(r.externalEnd - r.externalBaseline)})`
  );
}

async function main(): Promise<void> {
  const { values } = parseArgs({ options: { cycles: { type: "string", default: "10000" } }, strict: true });
  const cycles = Number(values.cycles);
  const s = await ChildServer.start();
  try {
    const r = await runLeakCycles(s, cycles, { onProgress: (n) => process.stderr.write(`  ${n} cycles, server fds ${s.fds()}, RSS ${(s.rss() / 1048576).toFixed(1)} MiB\n`) });
    console.log(formatLeak(r));
    if (r.fdsEnd !== r.fdsBaseline) process.exitCode = 1;
  } finally {
    await s.stop();
  }
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href) await main();

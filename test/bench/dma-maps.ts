/**
 * Filling the DMA map table: 65,535 DMA_MAPs (the spec's default
 * max_dma_maps) against a server in its own process, then DMA_UNMAPs while
 * the table is full. Message-only regions (no fd: nothing is mmap'd), 4 KiB
 * each with a 4 KiB gap, so no two are adjacent. Requests are pipelined in
 * windows of WINDOW and each window waits for its replies, so what is timed
 * is the server's cost per map, not a round trip per map.
 *
 * Used by `npm run bench` (run.ts, `dmaMapRows`); also runs alone:
 *
 *   npx tsx test/bench/dma-maps.ts [MAPS]
 *
 * which starts `vfio-user-ts serve --device edu` itself and prints the
 * result as JSON.
 */
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import {
  Command,
  DmaMapFlags,
  DmaUnmapFlags,
  FrameDecoder,
  U32_MAX,
  commandHeader,
  encodeDmaMapRequest,
  encodeDmaUnmapRequest,
  encodeMessage,
  encodeVersion,
} from "../../protocol/index.ts";
import { UnixConnection } from "../../src/transport/unix-socket.ts";

export const MAX_DMA_MAPS = 65_535;
const WINDOW = 256;
/** Maps timed at the start and at the end of the fill. */
const SAMPLE = 1024;
const REGION = 0x1000n;
const STRIDE = 0x2000n;

export interface DmaMapFill {
  maps: number;
  /** Wall time of the whole fill, ms. */
  fillMs: number;
  /** Per map over the first SAMPLE maps (table nearly empty), µs. */
  firstMapUs: number;
  /** Per map over the last SAMPLE maps (table nearly full), µs. */
  lastMapUs: number;
  /** Per unmap over SAMPLE unmaps of the highest regions with the table full, µs. */
  fullUnmapUs: number;
  /** Maps refused (should be 0). */
  refused: number;
}

/** A pipelining client over the native transport: send many, wait for the replies. */
class PipeClient {
  private readonly conn: UnixConnection;
  private readonly decoder = new FrameDecoder({ maxFrameSize: U32_MAX, onFrame: (f) => this.onReply(f.header.error) });
  private outstanding = 0;
  private wake: (() => void) | null = null;
  private nextId = 1;
  errors = 0;
  closed = false;

  constructor(socketPath: string) {
    this.conn = UnixConnection.connect(socketPath);
    this.conn.start({
      data: (chunk) => this.decoder.push(chunk),
      close: () => {
        this.closed = true;
        this.wake?.();
      },
    });
  }

  private onReply(error: number): void {
    if (error !== 0) this.errors++;
    this.outstanding--;
    if (this.outstanding === 0) this.wake?.();
  }

  send(command: number, body: Uint8Array): void {
    this.outstanding++;
    this.conn.send(encodeMessage(commandHeader(this.nextId, command), body));
    this.nextId = (this.nextId + 1) & 0xffff;
  }

  /** Resolves when every request sent so far has its reply. */
  drain(): Promise<void> {
    if (this.outstanding === 0) return Promise.resolve();
    return new Promise((resolve, reject) => {
      this.wake = () => {
        this.wake = null;
        if (this.closed && this.outstanding > 0) reject(new Error("server closed the connection"));
        else resolve();
      };
    });
  }

  close(): void {
    this.conn.close();
  }
}

const mapBody = (i: number): Buffer =>
  encodeDmaMapRequest({ argsz: 32, flags: DmaMapFlags.READ | DmaMapFlags.WRITE, offset: 0n, address: BigInt(i) * STRIDE, size: REGION });
const unmapBody = (i: number): Buffer => encodeDmaUnmapRequest({ argsz: 24, flags: 0, address: BigInt(i) * STRIDE, size: REGION });

/** Maps [from, to) in windows; returns the wall time in ns. */
async function run(c: PipeClient, from: number, to: number, body: (i: number) => Buffer, command: number): Promise<number> {
  const t0 = process.hrtime.bigint();
  for (let i = from; i < to; ) {
    const end = Math.min(to, i + WINDOW);
    for (; i < end; i++) c.send(command, body(i));
    await c.drain();
  }
  return Number(process.hrtime.bigint() - t0);
}

/** Fills the table of the server at `socketPath` with `maps` DMA_MAPs, times the ends, then unmaps everything. */
export async function fillDmaTable(socketPath: string, maps = MAX_DMA_MAPS): Promise<DmaMapFill> {
  const c = new PipeClient(socketPath);
  try {
    c.send(Command.VERSION, encodeVersion({ major: 0, minor: 0, data: JSON.stringify({ capabilities: { max_dma_maps: maps } }) }));
    await c.drain();
    const sample = Math.min(SAMPLE, Math.floor(maps / 4));
    const t0 = process.hrtime.bigint();
    const firstNs = await run(c, 0, sample, mapBody, Command.DMA_MAP);
    await run(c, sample, maps - sample, mapBody, Command.DMA_MAP);
    const lastNs = await run(c, maps - sample, maps, mapBody, Command.DMA_MAP);
    const fillMs = Number(process.hrtime.bigint() - t0) / 1e6;
    const refused = c.errors;
    // with the table full, unmap the highest regions (the far end of a sorted list)
    const unmapNs = await run(c, maps - sample, maps, (i) => unmapBody(maps - sample + (maps - 1 - i)), Command.DMA_UNMAP);
    c.send(Command.DMA_UNMAP, encodeDmaUnmapRequest({ argsz: 24, flags: DmaUnmapFlags.ALL, address: 0n, size: 0n }));
    await c.drain();
    return {
      maps,
      fillMs,
      firstMapUs: firstNs / sample / 1000,
      lastMapUs: lastNs / sample / 1000,
      fullUnmapUs: unmapNs / sample / 1000,
      refused,
    };
  } finally {
    c.close();
  }
}

// ---------------------------------------------------------------- standalone

async function main(): Promise<void> {
  const maps = Number(process.argv[2] ?? MAX_DMA_MAPS);
  const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
  const dir = mkdtempSync(path.join(os.tmpdir(), "vfio-dmamaps-"));
  const sock = path.join(dir, "edu.sock");
  const srv = spawn(process.execPath, [path.join(root, "src/cli/vfio-user-ts.mjs"), "serve", "--device", "edu", "--socket", sock, "--log-level", "warn", "--log-format", "json"], {
    stdio: ["ignore", "ignore", "inherit"],
  });
  try {
    for (let i = 0; i < 400 && !existsSync(sock); i++) await new Promise((r) => setTimeout(r, 25));
    const cpu0 = cpuMs(srv.pid!);
    const r = await fillDmaTable(sock, maps);
    console.log(JSON.stringify({ ...r, serverCpuMs: cpuMs(srv.pid!) - cpu0 }));
  } finally {
    srv.kill("SIGTERM");
    rmSync(dir, { recursive: true, force: true });
  }
}

/** User + system CPU of a process, ms (from /proc, clock ticks of 10 ms). */
function cpuMs(pid: number): number {
  const f = readFileSync(`/proc/${pid}/stat`, "utf8");
  const fields = f.slice(f.lastIndexOf(")") + 2).split(" ");
  return (Number(fields[11]) + Number(fields[12])) * 10;
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  main().catch((err: unknown) => {
    console.error(err);
    process.exitCode = 1;
  });
}

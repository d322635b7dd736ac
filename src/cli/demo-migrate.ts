/**
 * `vfio-user-ts demo migrate`: live migration of a bigmem device between two
 * server processes, with a workload running during pre-copy, then checked.
 *
 *   1. Two `vfio-user-ts serve --device bigmem` processes on sockets in a
 *      fresh temp dir; a client on each, guest RAM (a memfd per side)
 *      DMA_MAPped with its fd so each server DMAs straight into its RAM.
 *   2. The client acts as the guest on the source: enables memory decoding,
 *      bus mastering and MSI, fills device memory from guest RAM by DMA.
 *   3. A workload (MMIO writes into device memory at random pages, guest
 *      CPU stores, DMA guest RAM -> device memory and back) runs during
 *      pre-copy, so device memory and guest RAM both get dirtied.
 *   4. MigrationDriver moves the device; the workload stops at switch-over.
 *   5. Verification against the source as it was at switch-over (it stays
 *      stopped until its registers were read): BAR0 registers, config
 *      space, guest RAM byte for byte, device memory by bigmem's checksum
 *      engine on both sides (the source is resumed for that only; nothing
 *      drives it) and spot reads; then the device keeps working on the
 *      destination: a DMA each way and its MSI through an eventfd.
 *
 * Exit status 0 only when every check passes. Both servers get SIGTERM at
 * the end and the temp dir is removed.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { BigmemReg, fnv1a32, CMD_IRQ, CMD_START, DMA_TO_GUEST, IRQ_DMA, STATUS_CSUM_BUSY, STATUS_DMA_BUSY, STATUS_DMA_ERROR } from "../../devices/bigmem/bigmem.ts";
import { IrqIndex, MigState } from "../../protocol/constants.ts";
import { closeFd, createEventfd, readEventfd, VfioUserClient, waitEventfd } from "../client/client.ts";
import { GuestMemory } from "../client/guest-memory.ts";
import { MigrationDriver, type MigrationProgress, type MigrationResult, type RoundStats } from "../client/migration-driver.ts";
import type { DeviceOptions } from "../device/api.ts";
import { formatSize, OptionError, parseSize } from "../device/options.ts";
import { RecordKind, StateStreamReader } from "../migration/state-stream.ts";
import { statesEqual, stateDifference } from "../device/state.ts";
import { bytes, inUnit, mbps, reportChart, reportSvg, reportTable } from "./demo-report.ts";
import { resolveDevice } from "./device-module.ts";
import { onInterrupt } from "./io.ts";
import { CLI_SCRIPT } from "./self.ts";
import { deviceOptionArgs, deviceOptionList, parseCommandArgs, UsageError } from "./usage.ts";

const BAR0 = 0;
const BAR2 = 2;
const PAGE = 4096;
/** Where guest RAM sits in the IOVA space: above 4 GiB, so DMA addresses are really 64-bit. */
export const RAM_IOVA = 0x1_0000_0000n;

// ---------------------------------------------------------------------------
// Server processes
// ---------------------------------------------------------------------------

export interface ServerProcess {
  readonly name: string;
  readonly socket: string;
  readonly child: ChildProcess;
  /** What the process printed (stdout and stderr, the last 64 KiB). */
  output(): string;
  /** SIGTERM, then SIGKILL after 5 s; resolves with the exit code. */
  stop(): Promise<number | null>;
}

export interface SpawnServerOptions {
  dir: string;
  name: string;
  device: string;
  /** --opt KEY=VALUE items. */
  deviceOptions?: string[];
  p2p?: boolean;
  logLevel?: string;
  /** How long to wait for the socket (default 20 s). */
  timeoutMs?: number;
}

/** Starts `vfio-user-ts serve` as a child process and waits for its socket. */
export async function spawnServer(opts: SpawnServerOptions): Promise<ServerProcess> {
  const socket = join(opts.dir, `${opts.name}.sock`);
  const args = [CLI_SCRIPT, "serve", "--device", opts.device, "--socket", socket, "--log-format", "json", "--log-level", opts.logLevel ?? "warn"];
  for (const o of opts.deviceOptions ?? []) args.push("--opt", o);
  if (opts.p2p) args.push("--p2p");
  const child = spawn(process.execPath, args, { stdio: ["ignore", "pipe", "pipe"] });
  let out = "";
  const keep = (b: Buffer): void => {
    out += b.toString();
    if (out.length > 65536) out = out.slice(-65536);
  };
  child.stdout!.on("data", keep);
  child.stderr!.on("data", keep);
  let exited: number | null | undefined;
  const exit = new Promise<number | null>((resolve) => child.once("exit", (code, signal) => resolve((exited = code ?? (signal ? 128 : null)))));
  const handle: ServerProcess = {
    name: opts.name,
    socket,
    child,
    output: () => out,
    async stop() {
      if (exited !== undefined) return exited;
      child.kill("SIGTERM");
      const timer = setTimeout(() => child.kill("SIGKILL"), 5000);
      const code = await exit;
      clearTimeout(timer);
      return code;
    },
  };
  const deadline = Date.now() + (opts.timeoutMs ?? 20_000);
  while (!(existsSync(socket) && statSync(socket).isSocket())) {
    if (exited !== undefined) throw new Error(`server '${opts.name}' exited with ${exited} before listening:\n${out}`);
    if (Date.now() > deadline) {
      await handle.stop();
      throw new Error(`server '${opts.name}' did not create ${socket} in time:\n${out}`);
    }
    await sleep(20);
  }
  return handle;
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

// ---------------------------------------------------------------------------
// The guest side of bigmem
// ---------------------------------------------------------------------------

/** Register names and offsets compared after migration (every 32-bit word of the map). */
const REGISTER_WORDS: ReadonlyArray<[string, number]> = [
  ["ID", BigmemReg.ID],
  ["MEM_SIZE.lo", BigmemReg.MEM_SIZE],
  ["MEM_SIZE.hi", BigmemReg.MEM_SIZE + 4],
  ["STATUS", BigmemReg.STATUS],
  ["GENERATION", BigmemReg.GENERATION],
  ["IRQ_STATUS", BigmemReg.IRQ_STATUS],
  ["DMA_GUEST.lo", BigmemReg.DMA_GUEST],
  ["DMA_GUEST.hi", BigmemReg.DMA_GUEST + 4],
  ["DMA_OFFSET.lo", BigmemReg.DMA_OFFSET],
  ["DMA_OFFSET.hi", BigmemReg.DMA_OFFSET + 4],
  ["DMA_LENGTH.lo", BigmemReg.DMA_LENGTH],
  ["DMA_LENGTH.hi", BigmemReg.DMA_LENGTH + 4],
  ["DMA_CMD", BigmemReg.DMA_CMD],
  ["CSUM_OFFSET.lo", BigmemReg.CSUM_OFFSET],
  ["CSUM_OFFSET.hi", BigmemReg.CSUM_OFFSET + 4],
  ["CSUM_LENGTH.lo", BigmemReg.CSUM_LENGTH],
  ["CSUM_LENGTH.hi", BigmemReg.CSUM_LENGTH + 4],
  ["CSUM_CMD", BigmemReg.CSUM_CMD],
  ["CSUM_RESULT", BigmemReg.CSUM_RESULT],
];

/** A guest driver for bigmem over a vfio-user client, with guest RAM mapped at ram.iova. */
export class BigmemGuest {
  memSize = 0n;
  /** Eventfd wired to MSI vector 0, or -1. */
  msiFd = -1;

  constructor(
    readonly client: VfioUserClient,
    readonly ram: GuestMemory,
  ) {}

  /** Reads the BAR sizes, checks the ID, maps guest RAM (unless told not to), enables the device. */
  async probe(opts: { mapRam?: boolean; enable?: boolean } = {}): Promise<void> {
    const c = this.client;
    const [bar0, bar2] = await Promise.all([c.regionInfo(BAR0), c.regionInfo(BAR2)]);
    const id = await c.readU32(BAR0, BigmemReg.ID);
    if (id >>> 16 !== 0xb16e) throw new Error(`not a bigmem device: ID 0x${id.toString(16)}`);
    if (bar0.size < 0x80n) throw new Error(`bigmem BAR0 of ${bar0.size} bytes is too small`);
    this.memSize = await c.readU64(BAR0, BigmemReg.MEM_SIZE);
    if (this.memSize !== bar2.size) throw new Error(`MEM_SIZE ${this.memSize} disagrees with BAR2 size ${bar2.size}`);
    if (opts.mapRam ?? true) await this.ram.mapInto(c);
    if (opts.enable ?? true) await c.enableDevice({ memory: true, busMaster: true });
  }

  /** Enables MSI and wires an eventfd to it (what a guest driver + the VMM do together). */
  async wireMsi(enableInConfig = true): Promise<number> {
    if (enableInConfig && !(await this.client.enableMsi())) throw new Error("bigmem has no MSI capability");
    if (this.msiFd < 0) this.msiFd = createEventfd();
    await this.client.setIrqEventfds(IrqIndex.MSI, 0, [this.msiFd]);
    return this.msiFd;
  }

  async status(): Promise<number> {
    return this.client.readU32(BAR0, BigmemReg.STATUS);
  }

  /** Waits until neither engine is busy. */
  async waitIdle(timeoutMs = 30_000): Promise<number> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const st = await this.status();
      if ((st & (STATUS_DMA_BUSY | STATUS_CSUM_BUSY)) === 0) return st;
      if (Date.now() > deadline) throw new Error(`bigmem still busy (STATUS 0x${st.toString(16)})`);
      await sleep(1);
    }
  }

  /**
   * One DMA between guest RAM (offset from the start of RAM) and device
   * memory; waits for it when `wait`. Returns false when the device
   * reported a DMA error.
   */
  async dma(guestOffset: number, deviceOffset: bigint, length: number, toGuest: boolean, opts: { irq?: boolean; wait?: boolean } = {}): Promise<boolean> {
    const c = this.client;
    await c.writeU64(BAR0, BigmemReg.DMA_GUEST, this.ram.iova + BigInt(guestOffset));
    await c.writeU64(BAR0, BigmemReg.DMA_OFFSET, deviceOffset);
    await c.writeU64(BAR0, BigmemReg.DMA_LENGTH, BigInt(length));
    await c.writeU32(BAR0, BigmemReg.DMA_CMD, CMD_START | (toGuest ? DMA_TO_GUEST : 0) | (opts.irq ? CMD_IRQ : 0));
    if (opts.wait === false) return true;
    const st = await this.waitIdle();
    return (st & STATUS_DMA_ERROR) === 0;
  }

  /** bigmem's checksum engine over [offset, offset + length) (default: all of device memory). */
  async checksum(offset = 0n, length = this.memSize, timeoutMs = 20_000): Promise<number> {
    const c = this.client;
    await c.writeU64(BAR0, BigmemReg.CSUM_OFFSET, offset);
    await c.writeU64(BAR0, BigmemReg.CSUM_LENGTH, length);
    await c.writeU32(BAR0, BigmemReg.CSUM_CMD, CMD_START);
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      if (((await c.readU32(BAR0, BigmemReg.CSUM_CMD)) & CMD_START) === 0) break;
      // the engine only runs while the device may run (not in STOP, STOP_COPY, RESUMING)
      if (Date.now() > deadline) throw new Error(`bigmem checksum did not finish within ${timeoutMs} ms (is the device stopped?)`);
      await sleep(2);
    }
    return c.readU32(BAR0, BigmemReg.CSUM_RESULT);
  }

  async registers(): Promise<Map<string, number>> {
    const out = new Map<string, number>();
    for (const [name, off] of REGISTER_WORDS) out.set(name, await this.client.readU32(BAR0, off));
    return out;
  }

  async readMemory(offset: bigint, length: number): Promise<Buffer> {
    return this.client.regionRead(BAR2, offset, length);
  }

  async writeMemory(offset: bigint, data: Uint8Array): Promise<void> {
    await this.client.regionWrite(BAR2, offset, data);
  }

  /** Fills device memory with random bytes by DMA from guest RAM (one RAM-sized piece at a time). */
  async fillFromGuest(): Promise<void> {
    const ramSize = Number(this.ram.size);
    for (let at = 0n; at < this.memSize; at += BigInt(ramSize)) {
      const n = Math.min(ramSize, Number(this.memSize - at));
      this.ram.randomize(0, n);
      if (!(await this.dma(0, at, n, false))) throw new Error("initial DMA into device memory failed");
    }
  }

  close(): void {
    closeFd(this.msiFd);
    this.msiFd = -1;
  }
}

// ---------------------------------------------------------------------------
// The workload
// ---------------------------------------------------------------------------

/** xorshift32: the workload is reproducible from its seed. */
class Rng {
  private s: number;
  constructor(seed: number) {
    this.s = seed >>> 0 || 0x9e3779b9;
  }
  next(): number {
    let x = this.s;
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    this.s = x >>> 0;
    return this.s;
  }
  below(n: number): number {
    return this.next() % n;
  }
  bytes(n: number): Buffer {
    const b = Buffer.allocUnsafe(n);
    for (let i = 0; i < n; i += 4) b.writeUInt32LE(this.next(), Math.min(i, n - 4));
    return b;
  }
}

export interface WorkloadStats {
  ops: number;
  mmioWrites: number;
  cpuWrites: number;
  dmaToDevice: number;
  dmaToGuest: number;
}

/** Guest activity: MMIO into device memory, CPU stores, DMA both ways; stop() quiesces the device. */
export class Workload {
  readonly stats: WorkloadStats = { ops: 0, mmioWrites: 0, cpuWrites: 0, dmaToDevice: 0, dmaToGuest: 0 };
  private running = false;
  private loop: Promise<void> | null = null;
  private readonly rng: Rng;
  error: Error | null = null;

  constructor(
    readonly guest: BigmemGuest,
    readonly opts: { seed?: number; pauseMs?: number; dmaBytes?: number } = {},
  ) {
    this.rng = new Rng(opts.seed ?? 0x5eed);
  }

  start(): void {
    if (this.running) return;
    this.running = true;
    this.loop = this.run();
  }

  /** Stops issuing requests and waits until the device is idle: the VM is stopped. */
  async stop(): Promise<void> {
    this.running = false;
    await this.loop;
    this.loop = null;
    await this.guest.waitIdle();
    if (this.error) throw this.error;
  }

  private async run(): Promise<void> {
    const g = this.guest;
    const r = this.rng;
    const memPages = Number(g.memSize / BigInt(PAGE));
    const dmaBytes = Math.min(this.opts.dmaBytes ?? 16 * PAGE, Number(g.ram.size), Number(g.memSize));
    const ramSpan = Number(g.ram.size) - dmaBytes;
    const devSpan = Number(g.memSize) - dmaBytes;
    try {
      while (this.running) {
        switch (r.below(4)) {
          case 0: {
            const at = BigInt(r.below(memPages) * PAGE + r.below(PAGE / 256) * 256);
            await g.writeMemory(at, r.bytes(256));
            this.stats.mmioWrites++;
            break;
          }
          case 1: {
            g.ram.write(r.below(Number(g.ram.size) / PAGE) * PAGE + r.below(8) * 512, r.bytes(512));
            this.stats.cpuWrites++;
            break;
          }
          case 2: {
            const guestAt = Math.floor(r.below(ramSpan / PAGE + 1)) * PAGE;
            const devAt = BigInt(Math.floor(r.below(devSpan / PAGE + 1)) * PAGE);
            await g.dma(guestAt, devAt, dmaBytes, false);
            this.stats.dmaToDevice++;
            break;
          }
          case 3: {
            const guestAt = Math.floor(r.below(ramSpan / PAGE + 1)) * PAGE;
            const devAt = BigInt(Math.floor(r.below(devSpan / PAGE + 1)) * PAGE);
            await g.dma(guestAt, devAt, dmaBytes, true);
            this.stats.dmaToGuest++;
            break;
          }
        }
        this.stats.ops++;
        await sleep(this.opts.pauseMs ?? 1);
      }
    } catch (err) {
      this.error = err as Error;
      this.running = false;
    }
  }
}

// ---------------------------------------------------------------------------
// Verification
// ---------------------------------------------------------------------------

export interface Check {
  name: string;
  ok: boolean;
  detail: string;
}

/** Registers, config space, guest RAM and spot reads: the source must still be stopped at switch-over. */
export async function compareAtSwitchover(src: BigmemGuest, dst: BigmemGuest, spotPages = 16): Promise<Check[]> {
  const checks: Check[] = [];
  const [rs, rd] = [await src.registers(), await dst.registers()];
  const diff = [...rs].filter(([k, v]) => rd.get(k) !== v).map(([k, v]) => `${k} 0x${v.toString(16)} != 0x${rd.get(k)!.toString(16)}`);
  checks.push({ name: "registers", ok: diff.length === 0, detail: diff.length === 0 ? `${rs.size} BAR0 words equal (GENERATION ${rs.get("GENERATION")})` : diff.join(", ") });

  const [cs, cd] = [await src.client.regionRead(7, 0, 256), await dst.client.regionRead(7, 0, 256)];
  let firstDiff = -1;
  for (let i = 0; i < 256 && firstDiff < 0; i++) if (cs[i] !== cd[i]) firstDiff = i;
  checks.push({ name: "config space", ok: firstDiff < 0, detail: firstDiff < 0 ? "256 bytes equal" : `differs at 0x${firstDiff.toString(16)}` });

  const page = src.ram.firstDifference(dst.ram);
  checks.push({ name: "guest RAM", ok: page < 0, detail: page < 0 ? `${bytes(src.ram.size)} equal byte for byte` : `page ${page} differs` });

  const pages = Number(src.memSize / BigInt(PAGE));
  const rng = new Rng(0xc0ffee);
  const picks = [0, pages - 1, ...Array.from({ length: Math.max(0, spotPages - 2) }, () => rng.below(pages))];
  const bad: number[] = [];
  for (const p of picks) {
    const at = BigInt(p * PAGE);
    const [a, b] = await Promise.all([src.readMemory(at, PAGE), dst.readMemory(at, PAGE)]);
    if (!a.equals(b)) bad.push(p);
  }
  checks.push({ name: "device memory spot reads", ok: bad.length === 0, detail: bad.length === 0 ? `${picks.length} pages equal` : `pages ${bad.join(", ")} differ` });
  return checks;
}

/** bigmem's checksum engine over all device memory on both sides (both must be RUNNING). */
export async function compareChecksums(src: BigmemGuest, dst: BigmemGuest): Promise<Check> {
  const [a, b] = await Promise.all([src.checksum(), dst.checksum()]);
  return { name: "device memory checksum", ok: a === b, detail: `FNV-1a 0x${a.toString(16).padStart(8, "0")} ${a === b ? "==" : "!="} 0x${b.toString(16).padStart(8, "0")} over ${bytes(src.memSize)}` };
}

/** The device works: a DMA each way, the done interrupt through MSI. */
export async function checkDeviceWorks(g: BigmemGuest, label: string): Promise<Check> {
  const problems: string[] = [];
  const len = Math.min(4 * PAGE, Number(g.memSize), Number(g.ram.size));
  const devAt = g.memSize - BigInt(len);
  const guestAt = Number(g.ram.size) - len;
  // guest RAM -> device memory
  const pattern = Buffer.alloc(len, 0);
  for (let i = 0; i < len; i += 4) pattern.writeUInt32LE((0xa5a50000 + i) >>> 0, i);
  g.ram.write(guestAt, pattern);
  if (!(await g.dma(guestAt, devAt, len, false))) problems.push("DMA to device failed");
  if (!(await g.readMemory(devAt, len)).equals(pattern)) problems.push("device memory does not hold the DMAed pattern");
  // device memory -> guest RAM, with the done interrupt
  await g.writeMemory(devAt, Buffer.alloc(Math.min(PAGE, len), 0x3c));
  if (g.msiFd >= 0) readEventfd(g.msiFd); // drop anything stale
  if (!(await g.dma(guestAt, devAt, len, true, { irq: true }))) problems.push("DMA to guest failed");
  const expect = await g.readMemory(devAt, len);
  if (!g.ram.read(guestAt, len).equals(expect)) problems.push("guest RAM does not hold the device's bytes");
  let irq = "no eventfd";
  if (g.msiFd >= 0) {
    try {
      await waitEventfd(g.msiFd, 5000);
      irq = "MSI delivered";
    } catch {
      problems.push("no MSI for the DMA done interrupt");
    }
  }
  const irqStatus = await g.client.readU32(BAR0, BigmemReg.IRQ_STATUS);
  if ((irqStatus & IRQ_DMA) === 0) problems.push("IRQ_STATUS lacks DMA done");
  await g.client.writeU32(BAR0, BigmemReg.IRQ_ACK, IRQ_DMA);
  return { name: `${label} works`, ok: problems.length === 0, detail: problems.length === 0 ? `DMA both ways, ${irq}` : problems.join("; ") };
}

/** FNV-1a of device memory computed by the client from BAR2 reads (for devices whose engine cannot run). */
export async function checksumByReads(g: BigmemGuest): Promise<number> {
  let h: number | undefined;
  const step = 1 << 20;
  for (let at = 0n; at < g.memSize; at += BigInt(step)) {
    const n = Math.min(step, Number(g.memSize - at));
    h = fnv1a32(await g.readMemory(at, n), h);
  }
  return h ?? fnv1a32(new Uint8Array(0));
}

// ---------------------------------------------------------------------------
// Any device: exercise, migrate, compare the two streams
// ---------------------------------------------------------------------------

const CONFIG = 7;

/**
 * What the guest does to a device it knows nothing about (as the compliance
 * suite does): memory space and bus mastering on, MSI on when it has it,
 * and one value written to every dword of the first KiB of each memory BAR.
 */
async function exerciseDevice(client: VfioUserClient): Promise<string> {
  await client.enableDevice({ memory: true, busMaster: true });
  const msi = await client.enableMsi();
  let dwords = 0;
  const bars: number[] = [];
  for (let i = 0; i < 6; i++) {
    const info = await client.regionInfo(i);
    if (info.size < 4n) continue;
    bars.push(i);
    const span = Math.min(1024, Number(info.size));
    for (let off = 0; off + 4 <= span; off += 4) {
      await client.writeU32(i, off, (0x5a000000 | (i << 16) | off) >>> 0);
      dwords++;
    }
  }
  return `memory + bus master on${msi ? ", MSI on" : ""}; ${dwords} dwords written in BAR${bars.length === 1 ? "" : "s"} ${bars.join(", ") || "(none)"}`;
}

/** A device's state stream as it would leave now: STOP -> STOP_COPY, read to the end, -> STOP. */
async function streamNow(client: VfioUserClient): Promise<{ header: unknown; states: unknown[]; pages: Map<string, string>; bytes: number }> {
  await client.setMigState(MigState.STOP_COPY);
  const { createHash } = await import("node:crypto");
  const pages = new Map<string, string>();
  const reader = new StateStreamReader({
    onRecord: (r) => {
      if (r.kind !== RecordKind.MEMORY) return;
      for (let at = 0; at < r.bytes.length; at += PAGE) {
        pages.set((r.offset + BigInt(at)).toString(16), createHash("sha1").update(r.bytes.subarray(at, at + PAGE)).digest("hex"));
      }
    },
  });
  const states: unknown[] = [];
  const collect = new StateStreamReader();
  let total = 0;
  for (;;) {
    const data = await client.migDataRead();
    if (data.length === 0) break;
    total += data.length;
    reader.push(data);
    // STATE records are small: a second reader keeps them (MEMORY would be kept too, so only while small)
    if (total <= 16 << 20) collect.push(data);
  }
  await client.setMigState(MigState.STOP);
  const decoded = reader.finish();
  if (total <= 16 << 20) states.push(...collect.finish().states);
  return { header: decoded.header, states, pages, bytes: total };
}

async function compareStreams(src: VfioUserClient, dst: VfioUserClient): Promise<Check> {
  const [a, b] = [await streamNow(src), await streamNow(dst)];
  const problems: string[] = [];
  if (!statesEqual(a.header, b.header)) problems.push(`headers differ: ${stateDifference(a.header, b.header)}`);
  if (a.states.length !== b.states.length) problems.push(`${a.states.length} STATE records vs ${b.states.length}`);
  a.states.forEach((s, i) => {
    const d = stateDifference(s, b.states[i]);
    if (d !== null) problems.push(`STATE record ${i + 1}: ${d}`);
  });
  let pageDiff = 0;
  for (const [off, h] of a.pages) if (b.pages.get(off) !== h) pageDiff++;
  if (a.pages.size !== b.pages.size || pageDiff > 0) problems.push(`device memory: ${pageDiff} of ${a.pages.size} pages differ (${b.pages.size} on the destination)`);
  const what = `${a.states.length} STATE record${a.states.length === 1 ? "" : "s"} (config space, MSI-X, saveState)${a.pages.size > 0 ? ` and ${a.pages.size} memory pages` : ""}, ${bytes(a.bytes)} each side`;
  return { name: "device state", ok: problems.length === 0, detail: problems.length === 0 ? `${what}: equal` : problems.join("; ") };
}

// ---------------------------------------------------------------------------
// The demo
// ---------------------------------------------------------------------------

/** The demo switches over once at most 1 MiB remains (the driver's default is 4 MiB). */
export const DEMO_THRESHOLD = 1 << 20;

export interface DemoOptions {
  /** --device: a shipped device's name or a module path (default "bigmem"). */
  device?: string;
  /** --opt items for the device. */
  deviceOptions?: DeviceOptions;
  /** bigmem's device memory (its size option), default "256M". */
  size?: string;
  /** Guest RAM per side in bytes, default 64 MiB. */
  ram?: bigint;
  p2p?: boolean;
  maxRounds?: number;
  thresholdBytes?: number;
  /** Run the workload during pre-copy (bigmem; default true). */
  workload?: boolean;
  /** Write the per-round chart here as SVG. */
  svg?: string;
  /** Progress lines (default: console.log). */
  print?: (line: string) => void;
  /** Live progress within a round, overwritten in place (default: on a terminal only). */
  progress?: (line: string | null) => void;
}

export interface DemoResult {
  ok: boolean;
  device: string;
  deviceSize: bigint;
  ramSize: bigint;
  migration: MigrationResult | null;
  checks: Check[];
  workload: WorkloadStats | null;
  error?: Error;
}

/** A progress line rewritten in place on a terminal (`null` clears it). */
function terminalProgress(): ((line: string | null) => void) | undefined {
  if (!process.stdout.isTTY) return undefined;
  let shown = false;
  return (line) => {
    if (line === null) {
      if (shown) process.stdout.write("\r\x1b[K");
      shown = false;
      return;
    }
    process.stdout.write(`\r\x1b[K${line.slice(0, (process.stdout.columns ?? 100) - 1)}`);
    shown = true;
  };
}

export async function runDemoMigrate(opts: DemoOptions = {}): Promise<DemoResult> {
  const print = opts.print ?? ((l: string) => console.log(l));
  const progress = opts.progress ?? (opts.print ? undefined : terminalProgress());
  const say = (line: string) => {
    progress?.(null);
    print(line);
  };
  const deviceSpec = opts.device ?? "bigmem";
  const isBigmem = deviceSpec === "bigmem";
  const deviceOptions: DeviceOptions = isBigmem ? { size: opts.size ?? "256M", ...opts.deviceOptions } : { ...opts.deviceOptions };
  const ramSize = opts.ram ?? 64n << 20n;
  const dir = mkdtempSync(join(tmpdir(), "vfio-user-migrate-"));
  const servers: ServerProcess[] = [];
  const clients: VfioUserClient[] = [];
  const rams: GuestMemory[] = [];
  const guests: BigmemGuest[] = [];
  const result: DemoResult = { ok: false, device: deviceSpec, deviceSize: 0n, ramSize, migration: null, checks: [], workload: null };
  let phase = "starting the servers";
  let released = false;
  const release = async () => {
    if (released) return;
    released = true;
    for (const g of guests) g.close();
    for (const c of clients) c.close();
    for (const r of rams) r.close();
    await Promise.all(servers.map((s) => s.stop()));
    rmSync(dir, { recursive: true, force: true });
  };
  const offInterrupt = onInterrupt(() => `demo migrate (${phase}); stopping both servers and removing ${dir}`, release);
  // a second Ctrl-C exits at once: the servers and the directory go anyway
  const atExit = () => {
    for (const sv of servers) sv.child.kill("SIGKILL");
    rmSync(dir, { recursive: true, force: true });
  };
  process.once("exit", atExit);
  try {
    const common = { dir, device: deviceSpec, deviceOptions: deviceOptionList(deviceOptions), p2p: opts.p2p };
    const spawned = await Promise.allSettled([spawnServer({ ...common, name: "source" }), spawnServer({ ...common, name: "destination" })]);
    for (const sp of spawned) if (sp.status === "fulfilled") servers.push(sp.value);
    for (const sp of spawned) if (sp.status === "rejected") throw sp.reason;
    const [srcServer, dstServer] = servers as [ServerProcess, ServerProcess];
    say(`servers: source pid ${srcServer.child.pid}, destination pid ${dstServer.child.pid} (sockets in ${dir})`);
    for (const sv of servers) {
      const c = await VfioUserClient.connect(sv.socket, { connectTimeoutMs: 5000 });
      clients.push(c);
      await c.negotiate();
      const ram = GuestMemory.create(ramSize, { iova: RAM_IOVA, name: `guest-ram-${sv.name}` });
      rams.push(ram);
    }
    const [srcClient, dstClient] = clients as [VfioUserClient, VfioUserClient];
    const [srcRam, dstRam] = rams as [GuestMemory, GuestMemory];
    let workload: Workload | null = null;
    let msiFd = -1;
    let t = performance.now();
    phase = "setting up the guest";
    if (isBigmem) {
      guests.push(new BigmemGuest(srcClient, srcRam), new BigmemGuest(dstClient, dstRam));
      const [src, dst] = guests as [BigmemGuest, BigmemGuest];
      await src.probe();
      await src.wireMsi();
      // the destination VMM maps its RAM; config space (memory, bus master, MSI) comes with the device state
      await dst.probe({ enable: false });
      result.deviceSize = src.memSize;
      say(`device: bigmem, ${bytes(src.memSize)} of device memory; guest RAM ${bytes(ramSize)} per side at IOVA 0x${RAM_IOVA.toString(16)}`);
      await src.fillFromGuest();
      src.ram.randomize(0, Number(ramSize));
      say(`guest: device memory filled by DMA from guest RAM (${(performance.now() - t).toFixed(0)} ms)`);
      workload = new Workload(src);
      if (opts.workload ?? true) workload.start();
    } else {
      await srcRam.mapInto(srcClient);
      await dstRam.mapInto(dstClient);
      const info = await srcClient.deviceInfo();
      const id = (await srcClient.regionRead(CONFIG, 0, 4)).readUInt32LE(0);
      say(`device: ${deviceSpec} (PCI ${(id & 0xffff).toString(16).padStart(4, "0")}:${(id >>> 16).toString(16).padStart(4, "0")}, ${info.num_regions} regions); guest RAM ${bytes(ramSize)} per side`);
      srcRam.randomize(0, Number(ramSize));
      say(`guest: ${await exerciseDevice(srcClient)}`);
      if (await srcClient.findCapability(0x05).then((c) => c >= 0)) {
        msiFd = createEventfd();
        await srcClient.setIrqEventfds(IrqIndex.MSI, 0, [msiFd]);
      }
    }

    let compared: Check | null = null;
    let compareMs = 0;
    let lastProgress = 0;
    let roundStart = performance.now();
    const pending: RoundStats[] = [];
    const roundLine = (r: RoundStats, next: { dirtyBytes: bigint; guestPages: number } | null): string => {
      const moved = r.deviceBytes + r.guestPages * PAGE;
      const u = inUnit([moved, r.deviceBytes, r.guestPages * PAGE, Number(next?.dirtyBytes ?? 0)]);
      const [all, dev, guest, dirty] = u.figures;
      const dirt = next ? `dirtied meanwhile and sent next: device ${dirty}, guest ${next.guestPages} pages` : "what it left dirty goes in stop-copy";
      return `round ${r.round} (${u.unit}): sent ${all} = device ${dev} + guest RAM ${guest} (${r.guestPages} pages) in ${r.elapsedMs.toFixed(0)} ms, ${mbps(moved, r.elapsedMs)} MB/s; ${dirt}`;
    };
    const driver = new MigrationDriver(
      { client: srcClient, ram: srcRam },
      { client: dstClient, ram: dstRam },
      {
        maxRounds: opts.maxRounds,
        thresholdBytes: opts.thresholdBytes ?? DEMO_THRESHOLD,
        stopVm: async () => {
          phase = "switch-over";
          await workload?.stop();
        },
        // the destination holds the loaded state and has not run yet: as QEMU restores MSI, wire the eventfd now
        beforeDestinationRunning: async () => {
          if (isBigmem) {
            await guests[1]!.wireMsi(false);
            return;
          }
          const t1 = performance.now();
          compared = await compareStreams(srcClient, dstClient);
          compareMs = performance.now() - t1;
        },
        onProgress: (p: MigrationProgress) => {
          const now = performance.now();
          if (now - lastProgress < 250) return;
          lastProgress = now;
          const of = p.budgetBytes > 0 ? ` of ${bytes(p.budgetBytes)}` : "";
          const line = `${p.phase === "precopy" ? `round ${p.round}` : "stop-copy"}: device ${bytes(p.deviceBytes)}${of}, ${mbps(p.deviceBytes, p.elapsedMs)} MB/s, guest ${p.guestPages} pages, ${(p.elapsedMs / 1000).toFixed(1)} s`;
          if (progress) progress(line);
          else if (p.elapsedMs > 2000 && now - roundStart > 1000) {
            roundStart = now;
            print(`  ... ${line}`);
          }
        },
        onRound: (r: RoundStats) => {
          phase = `pre-copy round ${r.round + 1}`;
          roundStart = performance.now();
          const prev = pending.pop();
          if (prev) say(roundLine(prev, { dirtyBytes: r.dirtyBytes, guestPages: r.guestPages }));
          pending.push(r);
        },
      },
    );
    phase = "attaching the migration driver";
    const attach = await driver.attach();
    say(
      `migration: source offers ${attach.source.preCopy ? "PRE_COPY" : "no PRE_COPY"}${attach.source.p2p ? " + P2P" : ""}, ` +
        `device dirty tracking ${attach.source.dirtyTracking ? "yes" : "no"}; switch-over at <= ${bytes(opts.thresholdBytes ?? DEMO_THRESHOLD)} remaining`,
    );
    t = performance.now();
    phase = "pre-copy round 1";
    const m = await driver.run();
    const last = pending.pop();
    if (last) say(roundLine(last, null));
    result.migration = m;
    result.workload = workload ? { ...workload.stats } : null;
    const downtime = m.downtimeMs - compareMs;
    say(
      `stop-copy: device ${bytes(m.stopCopyDeviceBytes)} (the state + what the last round left dirty), guest ${m.finalGuestPages} page${m.finalGuestPages === 1 ? "" : "s"}; ` +
        `destination RUNNING after ${downtime.toFixed(1)} ms downtime${compareMs > 0 ? ` (not counting ${compareMs.toFixed(0)} ms comparing the streams before it ran)` : ""}`,
    );

    // ---- verification ----
    phase = "verifying";
    if ((await srcClient.getMigState()) !== MigState.STOP) throw new Error("the source is not stopped after switch-over");
    if (isBigmem) {
      const [src, dst] = guests as [BigmemGuest, BigmemGuest];
      result.checks.push(...(await compareAtSwitchover(src, dst)));
      // the checksum engine needs a running device: resume the source (idle, nothing drives it)
      await srcClient.setMigState(MigState.RUNNING);
      result.checks.push(await compareChecksums(src, dst));
      result.checks.push(await checkDeviceWorks(dst, "destination device"));
    } else {
      result.checks.push(compared ?? { name: "device state", ok: false, detail: "not compared" });
      const [cs, cd] = [await srcClient.regionRead(CONFIG, 0, 256), await dstClient.regionRead(CONFIG, 0, 256)];
      const at = cs.findIndex((b, i) => b !== cd[i]);
      result.checks.push({ name: "config space", ok: at < 0, detail: at < 0 ? "256 bytes equal" : `differs at 0x${at.toString(16)}` });
      const page = srcRam.firstDifference(dstRam);
      result.checks.push({ name: "guest RAM", ok: page < 0, detail: page < 0 ? `${bytes(srcRam.size)} equal byte for byte` : `page ${page} differs` });
      const st = await dstClient.getMigState();
      result.checks.push({ name: "destination device runs", ok: st === MigState.RUNNING, detail: `migration state ${st === MigState.RUNNING ? "RUNNING" : st}` });
    }
    if (msiFd >= 0) closeFd(msiFd);
    result.ok = result.checks.every((c) => c.ok);

    say("");
    for (const line of reportTable(m)) say(`  ${line}`);
    say("");
    for (const line of reportChart(m)) say(line);
    say("");
    say("summary");
    say(`  device            ${deviceSpec}${isBigmem ? `, ${bytes(result.deviceSize)} of device memory` : ""}; guest RAM ${bytes(ramSize)} per side; P2P ${m.p2p ? "yes" : "no"}`);
    const moved = inUnit([m.totalBytes, m.deviceBytes, m.guestBytes]);
    say(`  bytes moved       ${moved.figures[0]} ${moved.unit} = device state ${moved.figures[1]} + guest RAM ${moved.figures[2]} (${m.guestBytes / PAGE} pages); ${mbps(m.totalBytes, m.totalMs)} MB/s over ${m.totalMs.toFixed(0)} ms`);
    if (result.workload) {
      const w = result.workload;
      say(`  workload          ${w.ops} ops during pre-copy: ${w.mmioWrites} MMIO writes, ${w.cpuWrites} CPU stores, ${w.dmaToDevice} + ${w.dmaToGuest} DMAs`);
    }
    const d = m.downtime;
    say(
      `  downtime          ${downtime.toFixed(1)} ms (STOP_COPY request to destination RUNNING): ` +
        `stop ${d.stopCopyMs.toFixed(1)}, drain ${d.drainMs.toFixed(1)}, guest pages ${d.guestMs.toFixed(1)}, ` +
        `destination load ${d.loadMs.toFixed(1)}, start ${(d.startMs - compareMs).toFixed(1)} ms`,
    );
    for (const c of result.checks) say(`  ${c.ok ? "ok  " : "FAIL"} ${c.name.padEnd(26)} ${c.detail}`);
    if (opts.svg) {
      writeFileSync(opts.svg, reportSvg(m, `vfio-user-ts demo migrate: ${deviceSpec}, ${m.rounds.length} pre-copy rounds, ${bytes(m.totalBytes)}`));
      say(`chart written to ${opts.svg}`);
    }
    say(result.ok ? "migration verified" : "VERIFICATION FAILED");
  } catch (err) {
    result.error = err as Error;
    result.ok = false;
    say(`demo failed during ${phase}: ${(err as Error).message}`);
    for (const sv of servers) {
      const out = sv.output().trim();
      if (out) print(`--- ${sv.name} server output ---\n${out.split("\n").slice(-20).join("\n")}`);
    }
  } finally {
    progress?.(null);
    offInterrupt();
    await release();
    process.off("exit", atExit);
  }
  return result;
}

export const DEMO_MIGRATE_USAGE = `Usage: vfio-user-ts demo migrate [options]

Live-migrates a device between two 'vfio-user-ts serve' processes and
checks the destination against the source. The default device, bigmem,
runs a workload during pre-copy (MMIO, CPU stores, DMA both ways) and is
checked register by register and by checksum; any other device (a shipped
one, or your module: --device ./my-device.js) is set up as a guest would
(memory, bus master, MSI, a value in each dword of the first KiB of each
BAR) and its state is compared record by record before the destination runs.

Prints each pre-copy round (and progress during long ones), a table whose
rows add up to the totals, a chart, and the downtime.

Options:
  --device NAME|PATH  device to migrate (default bigmem)
  --opt KEY=VALUE     device option, repeatable
  --size SIZE         bigmem's device memory (default 256M; same as --opt size=)
  --ram SIZE          guest RAM per side (default 64M)
  --p2p               offer and use the P2P states (RUNNING_P2P, PRE_COPY_P2P)
  --max-rounds N      pre-copy rounds at most (default 10)
  --threshold SIZE    switch over once at most this much remains (default 1M)
  --no-workload       migrate an idle bigmem
  --svg FILE          also draw the rounds and the downtime as SVG
  -h, --help          this text`;

function sizeArg(name: string, text: string): bigint {
  try {
    return parseSize(text);
  } catch (err) {
    throw new UsageError(`--${name}: ${(err as OptionError).message}`, "demo migrate");
  }
}

export async function demoMigrateMain(argv: string[]): Promise<number> {
  const { values } = parseCommandArgs("demo migrate", argv, {
    device: { type: "string", default: "bigmem" },
    opt: { type: "string", multiple: true },
    size: { type: "string" },
    ram: { type: "string", default: "64M" },
    p2p: { type: "boolean", default: false },
    "max-rounds": { type: "string" },
    threshold: { type: "string" },
    "no-workload": { type: "boolean", default: false },
    svg: { type: "string" },
    help: { type: "boolean", short: "h", default: false },
  });
  if (values.help) {
    console.log(DEMO_MIGRATE_USAGE);
    return 0;
  }
  const cmd = "demo migrate";
  const { factory, spec } = await resolveDevice(values.device!, cmd);
  const isBigmem = spec === "bigmem";
  const options: Record<string, string> = { ...deviceOptionArgs(values.opt, cmd) };
  if (values.size !== undefined) {
    if (!isBigmem) throw new UsageError("--size is bigmem's device memory; give your device's options with --opt", cmd);
    if (options.size !== undefined) throw new UsageError("--size and --opt size= both given", cmd);
    options.size = formatSize(sizeArg("size", values.size));
  }
  if (isBigmem) options.size ??= "256M";
  // the device's own checks (unknown keys, ranges) before any process starts
  try {
    await factory.create(options).dispose?.();
  } catch (err) {
    throw new UsageError(err instanceof OptionError ? err.message : `device '${factory.name}': ${(err as Error).message}`, cmd);
  }
  if (!isBigmem && values["no-workload"]) throw new UsageError("--no-workload applies to bigmem (other devices get no workload)", cmd);
  const ram = sizeArg("ram", values.ram!);
  if (ram < 1n << 20n || ram % 4096n !== 0n) throw new UsageError(`--ram must be a multiple of 4096 of at least 1M, got ${values.ram}`, cmd);
  let maxRounds: number | undefined;
  if (values["max-rounds"] !== undefined) {
    maxRounds = Number(values["max-rounds"]);
    if (!Number.isInteger(maxRounds) || maxRounds < 1) throw new UsageError(`--max-rounds must be an integer of at least 1, got '${values["max-rounds"]}'`, cmd);
  }
  const threshold = values.threshold !== undefined ? Number(sizeArg("threshold", values.threshold)) : undefined;
  if (values.svg === "") throw new UsageError("--svg needs a file name", cmd);
  const result = await runDemoMigrate({
    device: spec,
    deviceOptions: options,
    ram,
    p2p: values.p2p,
    maxRounds,
    thresholdBytes: threshold,
    workload: !values["no-workload"],
    svg: values.svg,
  });
  return result.ok ? 0 : 1;
}

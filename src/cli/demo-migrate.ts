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
import { existsSync, mkdtempSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { BigmemReg, fnv1a32, CMD_IRQ, CMD_START, DMA_TO_GUEST, IRQ_DMA, STATUS_CSUM_BUSY, STATUS_DMA_BUSY, STATUS_DMA_ERROR } from "../../devices/bigmem/bigmem.ts";
import { IrqIndex, MigState } from "../../protocol/constants.ts";
import { closeFd, createEventfd, readEventfd, VfioUserClient, waitEventfd } from "../client/client.ts";
import { GuestMemory } from "../client/guest-memory.ts";
import { MigrationDriver, type MigrationResult, type RoundStats } from "../client/migration-driver.ts";
import { UsageError } from "./main.ts";

const CLI = fileURLToPath(new URL("./vfio-user-ts.mjs", import.meta.url));
const BAR0 = 0;
const BAR2 = 2;
const PAGE = 4096;
/** Where guest RAM sits in the IOVA space: above 4 GiB, so DMA addresses are really 64-bit. */
export const RAM_IOVA = 0x1_0000_0000n;

// ---------------------------------------------------------------------------
// Sizes
// ---------------------------------------------------------------------------

const UNITS: Record<string, bigint> = { "": 1n, k: 1n << 10n, m: 1n << 20n, g: 1n << 30n };

/** "64M", "1G", "4096", "0x1000" -> bytes. */
export function parseSize(text: string): bigint {
  const m = /^\s*(0x[0-9a-f]+|[0-9]+)\s*(?:([kmg])(?:i?b)?)?\s*$/i.exec(text);
  if (!m) throw new Error(`'${text}' is not a size like 64M or 1G`);
  return BigInt(m[1]!) * UNITS[(m[2] ?? "").toLowerCase()]!;
}

/** Bytes for people: MiB with one decimal, KiB below 1 MiB. */
export function mib(bytes: number | bigint): string {
  const n = Number(bytes);
  if (n > 0 && n < 1 << 20) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / (1 << 20)).toFixed(1)} MiB`;
}

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
  const args = [CLI, "serve", "--device", opts.device, "--socket", socket, "--log-format", "json", "--log-level", opts.logLevel ?? "warn"];
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
  checks.push({ name: "guest RAM", ok: page < 0, detail: page < 0 ? `${mib(src.ram.size)} equal byte for byte` : `page ${page} differs` });

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
  return { name: "device memory checksum", ok: a === b, detail: `FNV-1a 0x${a.toString(16).padStart(8, "0")} ${a === b ? "==" : "!="} 0x${b.toString(16).padStart(8, "0")} over ${mib(src.memSize)}` };
}

/** The device works: a DMA each way, the done interrupt through MSI. */
export async function checkDeviceWorks(g: BigmemGuest, label: string): Promise<Check> {
  const problems: string[] = [];
  const len = 4 * PAGE;
  const devAt = g.memSize - BigInt(len);
  const guestAt = Number(g.ram.size) - len;
  // guest RAM -> device memory
  const pattern = Buffer.alloc(len, 0);
  for (let i = 0; i < len; i += 4) pattern.writeUInt32LE((0xa5a50000 + i) >>> 0, i);
  g.ram.write(guestAt, pattern);
  if (!(await g.dma(guestAt, devAt, len, false))) problems.push("DMA to device failed");
  if (!(await g.readMemory(devAt, len)).equals(pattern)) problems.push("device memory does not hold the DMAed pattern");
  // device memory -> guest RAM, with the done interrupt
  await g.writeMemory(devAt, Buffer.alloc(PAGE, 0x3c));
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
// The demo
// ---------------------------------------------------------------------------

/** The demo switches over once at most 1 MiB remains (the driver's default is 4 MiB). */
export const DEMO_THRESHOLD = 1 << 20;

export interface DemoOptions {
  /** Device memory (bigmem size option), default "256M". */
  size?: string;
  /** Guest RAM per side in bytes, default 64 MiB. */
  ram?: bigint;
  p2p?: boolean;
  maxRounds?: number;
  thresholdBytes?: number;
  /** Run the workload during pre-copy (default true). */
  workload?: boolean;
  /** Progress lines (default: console.log). */
  print?: (line: string) => void;
}

export interface DemoResult {
  ok: boolean;
  deviceSize: bigint;
  ramSize: bigint;
  migration: MigrationResult | null;
  checks: Check[];
  workload: WorkloadStats | null;
  error?: Error;
}

export async function runDemoMigrate(opts: DemoOptions = {}): Promise<DemoResult> {
  const print = opts.print ?? ((l: string) => console.log(l));
  const sizeText = opts.size ?? "256M";
  const ramSize = opts.ram ?? 64n << 20n;
  const dir = mkdtempSync(join(tmpdir(), "vfio-user-migrate-"));
  const servers: ServerProcess[] = [];
  const clients: VfioUserClient[] = [];
  const rams: GuestMemory[] = [];
  const guests: BigmemGuest[] = [];
  const result: DemoResult = { ok: false, deviceSize: 0n, ramSize, migration: null, checks: [], workload: null };
  try {
    const common = { dir, device: "bigmem", deviceOptions: [`size=${sizeText}`], p2p: opts.p2p };
    const spawned = await Promise.allSettled([spawnServer({ ...common, name: "source" }), spawnServer({ ...common, name: "destination" })]);
    for (const s of spawned) if (s.status === "fulfilled") servers.push(s.value);
    for (const s of spawned) if (s.status === "rejected") throw s.reason;
    const [srcServer, dstServer] = servers as [ServerProcess, ServerProcess];
    print(`servers: source pid ${srcServer.child.pid}, destination pid ${dstServer.child.pid} (sockets in ${dir})`);
    for (const s of servers) {
      const c = await VfioUserClient.connect(s.socket, { connectTimeoutMs: 5000 });
      clients.push(c);
      await c.negotiate();
      const ram = GuestMemory.create(ramSize, { iova: RAM_IOVA, name: `guest-ram-${s.name}` });
      rams.push(ram);
      guests.push(new BigmemGuest(c, ram));
    }
    const [src, dst] = guests as [BigmemGuest, BigmemGuest];
    await src.probe();
    await src.wireMsi();
    // the destination VMM maps its RAM; config space (memory, bus master, MSI) comes with the device state
    await dst.probe({ enable: false });
    result.deviceSize = src.memSize;
    print(`device: bigmem, ${mib(src.memSize)} of device memory; guest RAM ${mib(ramSize)} per side at IOVA 0x${RAM_IOVA.toString(16)}`);

    let t = performance.now();
    await src.fillFromGuest();
    src.ram.randomize(0, Number(ramSize));
    print(`guest: device memory filled by DMA from guest RAM (${(performance.now() - t).toFixed(0)} ms)`);

    const workload = new Workload(src);
    if (opts.workload ?? true) workload.start();
    const driver = new MigrationDriver(
      { client: src.client, ram: src.ram },
      { client: dst.client, ram: dst.ram },
      {
        maxRounds: opts.maxRounds,
        thresholdBytes: opts.thresholdBytes ?? DEMO_THRESHOLD,
        stopVm: () => workload.stop(),
        // as QEMU restores MSI when it loads config space: wire the eventfd before the device runs
        beforeDestinationRunning: async () => {
          await dst.wireMsi(false);
        },
        onRound: (r: RoundStats) =>
          print(
            `pre-copy round ${r.round}: device ${mib(r.deviceBytes)} (initial ${mib(r.initialBytes)}, dirty ${mib(r.dirtyBytes)}), ` +
              `guest ${r.guestPages} pages, ${r.elapsedMs.toFixed(0)} ms`,
          ),
      },
    );
    const attach = await driver.attach();
    print(
      `migration: source offers ${attach.source.preCopy ? "PRE_COPY" : "no PRE_COPY"}${attach.source.p2p ? " + P2P" : ""}, ` +
        `device dirty tracking ${attach.source.dirtyTracking ? "yes" : "no"}; switch-over at <= ${mib(opts.thresholdBytes ?? DEMO_THRESHOLD)} remaining`,
    );
    t = performance.now();
    const m = await driver.run();
    result.migration = m;
    result.workload = { ...workload.stats };
    print(
      `switch-over: stop-copy ${mib(m.stopCopyDeviceBytes)} of device state, ${m.finalGuestPages} guest pages; ` +
        `destination RUNNING after ${m.downtimeMs.toFixed(1)} ms downtime (total ${(performance.now() - t).toFixed(0)} ms)`,
    );

    // ---- verification ----
    if ((await src.client.getMigState()) !== MigState.STOP) throw new Error("the source is not stopped after switch-over");
    result.checks.push(...(await compareAtSwitchover(src, dst)));
    // the checksum engine needs a running device: resume the source (idle, nothing drives it)
    await src.client.setMigState(MigState.RUNNING);
    result.checks.push(await compareChecksums(src, dst));
    result.checks.push(await checkDeviceWorks(dst, "destination device"));
    result.ok = result.checks.every((c) => c.ok);

    print("");
    print("summary");
    print(`  device memory     ${mib(result.deviceSize)} (bigmem), guest RAM ${mib(ramSize)} per side, P2P ${m.p2p ? "yes" : "no"}`);
    print(`  pre-copy rounds   ${m.rounds.length}: ${m.rounds.map((r) => mib(r.deviceBytes)).join(", ")} of device state`);
    print(`  bytes moved       device ${mib(m.deviceBytes)} + guest RAM ${mib(m.guestBytes)} = ${mib(m.totalBytes)}`);
    const resent = Math.max(0, m.deviceBytes - Number(m.rounds[0]?.initialBytes ?? m.stopCopyEstimate));
    print(`  dirty pages       guest ${m.dirtyGuestPages} after the first pass (${m.finalGuestPages} in the downtime); ` +
      `device ${mib(resent)} (~${Math.round(resent / PAGE)} pages) re-sent after its first pass`);
    print(`  workload          ${result.workload.ops} ops: ${result.workload.mmioWrites} MMIO, ${result.workload.cpuWrites} CPU stores, ${result.workload.dmaToDevice} + ${result.workload.dmaToGuest} DMAs`);
    const d = m.downtime;
    print(`  downtime          ${m.downtimeMs.toFixed(1)} ms (STOP_COPY request to destination RUNNING): ` +
      `stop ${d.stopCopyMs.toFixed(1)}, drain ${d.drainMs.toFixed(1)}, guest pages ${d.guestMs.toFixed(1)}, ` +
      `destination load ${d.loadMs.toFixed(1)}, start ${d.startMs.toFixed(1)} ms`);
    for (const c of result.checks) print(`  ${c.ok ? "ok  " : "FAIL"} ${c.name.padEnd(26)} ${c.detail}`);
    print(result.ok ? "migration verified" : "VERIFICATION FAILED");
  } catch (err) {
    result.error = err as Error;
    result.ok = false;
    print(`demo failed: ${(err as Error).message}`);
    for (const s of servers) {
      const out = s.output().trim();
      if (out) print(`--- ${s.name} server output ---\n${out.split("\n").slice(-20).join("\n")}`);
    }
  } finally {
    for (const g of guests) g.close();
    for (const c of clients) c.close();
    for (const r of rams) r.close();
    await Promise.all(servers.map((s) => s.stop()));
    rmSync(dir, { recursive: true, force: true });
  }
  return result;
}

export const DEMO_MIGRATE_USAGE = `Usage: vfio-user-ts demo migrate [options]

Live-migrates a bigmem device between two 'vfio-user-ts serve' processes
while a workload runs, then checks the destination against the source.

Options:
  --size SIZE        device memory (default 256M)
  --ram SIZE         guest RAM per side (default 64M)
  --p2p              offer and use the P2P states (RUNNING_P2P, PRE_COPY_P2P)
  --max-rounds N     pre-copy rounds at most (default 10)
  --threshold SIZE   switch over once at most this much remains (default 1M)
  --no-workload      migrate an idle device
  -h, --help         this text`;

export async function demoMigrateMain(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      size: { type: "string", default: "256M" },
      ram: { type: "string", default: "64M" },
      p2p: { type: "boolean", default: false },
      "max-rounds": { type: "string" },
      threshold: { type: "string" },
      "no-workload": { type: "boolean", default: false },
      help: { type: "boolean", short: "h", default: false },
    },
    strict: true,
    allowPositionals: false,
  });
  if (values.help) {
    console.log(DEMO_MIGRATE_USAGE);
    return 0;
  }
  const size = parseSize(values.size!);
  if (size < 4096n || (size & (size - 1n)) !== 0n) throw new UsageError(`--size must be a power of two of at least 4096 bytes, got ${values.size}`);
  const ram = parseSize(values.ram!);
  if (ram < 1n << 20n || ram % 4096n !== 0n) throw new UsageError(`--ram must be a multiple of 4096 of at least 1M, got ${values.ram}`);
  const maxRounds = values["max-rounds"] !== undefined ? Number.parseInt(values["max-rounds"], 10) : undefined;
  if (maxRounds !== undefined && !(maxRounds >= 1)) throw new UsageError("--max-rounds must be at least 1");
  const result = await runDemoMigrate({
    size: values.size,
    ram,
    p2p: values.p2p,
    maxRounds,
    thresholdBytes: values.threshold !== undefined ? Number(parseSize(values.threshold)) : undefined,
    workload: !values["no-workload"],
  });
  return result.ok ? 0 : 1;
}

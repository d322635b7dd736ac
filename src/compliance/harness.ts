/**
 * The compliance suite's test bench: a device from its factory, served by a
 * real VfioUserServer on a UNIX socket in a temporary directory, and a
 * VfioUserClient connected to it. Everything a check does to the device goes
 * through the protocol; the one exception is `state()`, the device's own
 * saveState (and its pre-copy memory), which checks compare.
 */
import { createHash } from "node:crypto";
import { setImmediate as nextTick } from "node:timers/promises";
import path from "node:path";
import type { Logger } from "pino";
import { PciBaseAddress, PciCapId, PciCommand, PciHeader, PciMsi, PciMsix, barOffset } from "../pci/registers.ts";
import type { BarDefinition, Device, DeviceFactory, DeviceOptions, PrecopyMemory, StateValue } from "../device/api.ts";
import { normalizeState, stateDifference } from "../device/state.ts";
import { RegionIndex } from "../../protocol/constants.ts";
import { VfioUserError } from "../../protocol/errors.ts";
import { VfioUserClient } from "../client/client.ts";
import { VfioUserServer } from "../server/server.ts";

export interface BenchOptions {
  factory: DeviceFactory;
  options: DeviceOptions;
  /** Directory for the socket. */
  dir: string;
  /** Socket file name inside `dir`. */
  name: string;
  log: Logger;
  requestTimeoutMs: number;
}

/** One device under test: server, socket, connected client. */
export class DeviceUnderTest {
  readonly device: Device;
  readonly server: VfioUserServer;
  readonly socket: string;
  /** Power-on config space size (from the region info once connected). */
  configSize = 0;
  private _client: VfioUserClient | null = null;
  private closed = false;

  /**
   * Creates the device and its server and listens; `connect()` is separate
   * so a check can look at the device before any access.
   */
  constructor(private readonly opts: BenchOptions) {
    this.device = opts.factory.create(opts.options);
    this.server = new VfioUserServer({ device: this.device, log: opts.log.child({ bench: opts.name }) });
    this.socket = path.join(opts.dir, `${opts.name}.sock`);
    this.server.listen(this.socket);
  }

  get client(): VfioUserClient {
    if (!this._client) throw new Error(`${this.opts.name}: not connected`);
    return this._client;
  }

  /** Connects and negotiates as QEMU does. */
  async connect(): Promise<VfioUserClient> {
    const client = await VfioUserClient.connect(this.socket, { requestTimeoutMs: this.opts.requestTimeoutMs });
    this._client = client;
    await client.negotiate();
    this.configSize = Number((await client.regionInfo(RegionIndex.CONFIG)).size);
    return client;
  }

  /** The whole config space, read through the protocol. */
  async readConfig(): Promise<Buffer> {
    return this.client.regionRead(RegionIndex.CONFIG, 0, this.configSize);
  }

  async config8(offset: number): Promise<number> {
    return (await this.client.regionRead(RegionIndex.CONFIG, offset, 1))[0]!;
  }

  async config16(offset: number): Promise<number> {
    return (await this.client.regionRead(RegionIndex.CONFIG, offset, 2)).readUInt16LE(0);
  }

  async config32(offset: number): Promise<number> {
    return this.client.readU32(RegionIndex.CONFIG, offset);
  }

  async writeConfig8(offset: number, value: number): Promise<void> {
    await this.client.regionWrite(RegionIndex.CONFIG, offset, Uint8Array.of(value & 0xff));
  }

  async writeConfig16(offset: number, value: number): Promise<void> {
    const b = Buffer.alloc(2);
    b.writeUInt16LE(value & 0xffff, 0);
    await this.client.regionWrite(RegionIndex.CONFIG, offset, b);
  }

  async writeConfig32(offset: number, value: number): Promise<void> {
    await this.client.writeU32(RegionIndex.CONFIG, offset, value);
  }

  /** The device's saveState, as a migration destination would receive it. */
  state(): StateValue {
    return normalizeState(this.device.saveState());
  }

  /** SHA-256 of the device's pre-copy memory, or null when it has none. */
  memoryDigest(): string | null {
    const mem = this.device.precopyMemory;
    if (!mem) return null;
    const h = createHash("sha256");
    const pages = Number(mem.size / BigInt(mem.pageSize));
    for (let p = 0; p < pages; p++) h.update(mem.readPage(p));
    return h.digest("hex");
  }

  /**
   * Waits until the device's state stops changing (work it started after a
   * register write has finished): two equal samples 10 ms apart, at most
   * `maxMs`. Returns false if it never settled.
   */
  async settle(maxMs = 1000): Promise<boolean> {
    await nextTick();
    let prev = this.state();
    let stable = 0;
    for (let waited = 0; waited < maxMs; waited += 10) {
      await new Promise((r) => setTimeout(r, 10));
      const cur = this.state();
      if (stateDifference(prev, cur) === null) {
        if (++stable >= 2) return true;
      } else {
        stable = 0;
      }
      prev = cur;
    }
    return false;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const c = this._client;
    if (c && !c.closed) {
      c.close();
      await c.closedPromise;
    }
    await this.server.close();
    // let the server's side of the connection finish closing
    await nextTick();
  }
}

/** The first difference between two devices' pre-copy memories, or null. */
export function memoryDifference(a: PrecopyMemory, b: PrecopyMemory): string | null {
  if (a.size !== b.size || a.pageSize !== b.pageSize) return `memory of ${a.size} bytes (pages of ${a.pageSize}) vs ${b.size} (pages of ${b.pageSize})`;
  const pages = Number(a.size / BigInt(a.pageSize));
  for (let p = 0; p < pages; p++) {
    const x = a.readPage(p);
    const y = b.readPage(p);
    if (!Buffer.from(x.buffer, x.byteOffset, x.byteLength).equals(Buffer.from(y.buffer, y.byteOffset, y.byteLength))) {
      return `device memory differs in page ${p} (offset 0x${(BigInt(p) * BigInt(a.pageSize)).toString(16)})`;
    }
  }
  return null;
}

/** Offsets of the config bytes that differ, as "0x04: 0x06 vs 0x00" lines (at most `max`). */
export function configDifferences(a: Uint8Array, b: Uint8Array, max = 8): string[] {
  const out: string[] = [];
  if (a.length !== b.length) return [`config space of ${a.length} bytes vs ${b.length}`];
  let n = 0;
  for (let i = 0; i < a.length; i++) {
    if (a[i] === b[i]) continue;
    if (++n <= max) out.push(`0x${i.toString(16).padStart(3, "0")}: 0x${a[i]!.toString(16).padStart(2, "0")} vs 0x${b[i]!.toString(16).padStart(2, "0")}`);
  }
  if (n > max) out.push(`... ${n - max} more`);
  return out;
}

/** The capability list as a guest walks it: [id, offset] pairs; throws on a malformed list. */
export function walkCapabilityList(config: Uint8Array): { id: number; offset: number }[] {
  const out: { id: number; offset: number }[] = [];
  const seen = new Set<number>();
  const first = config[PciHeader.CAPABILITY_LIST]!;
  if (first & 3) throw new Error(`capability pointer at 0x34 is 0x${first.toString(16)}, not dword aligned`);
  let ptr = first;
  while (ptr !== 0) {
    if (ptr < 0x40) throw new Error(`capability pointer 0x${ptr.toString(16)} points into the header`);
    if (ptr + 2 > 0x100) throw new Error(`capability pointer 0x${ptr.toString(16)} leaves conventional config space`);
    if (seen.has(ptr)) throw new Error(`capability list loops back to 0x${ptr.toString(16)}`);
    seen.add(ptr);
    out.push({ id: config[ptr]!, offset: ptr });
    const next = config[ptr + 1]!;
    if (next & 3) throw new Error(`next pointer of the capability at 0x${ptr.toString(16)} is 0x${next.toString(16)}, not dword aligned`);
    ptr = next;
  }
  return out;
}

/** Slots a BAR definition occupies. */
export function barSlots(bar: Pick<BarDefinition, "index" | "kind">): number[] {
  return bar.kind === "mem64" ? [bar.index, bar.index + 1] : [bar.index];
}

const EXERCISE_SPAN = 1024;
const EXERCISE_SPOTS = 16;

export interface ExerciseResult {
  writes: number;
  refused: number;
}

/**
 * Guest-like writes that leave the device in a non-power-on state, knowing
 * nothing of its registers:
 *
 * - config (`config: true`): memory, I/O and bus master enabled, cache line
 *   size, latency timer and interrupt line set, every BAR programmed with an
 *   address, and MSI-X (or else MSI) set up and enabled;
 * - every BAR: `value` written as a 32-bit word at each dword of the first
 *   1 KiB, and at 16 spots spread over the rest of a larger BAR.
 *
 * A device may refuse some accesses (an error reply); they are counted.
 */
export async function exercise(dut: DeviceUnderTest, value: number, opts: { config: boolean }): Promise<ExerciseResult> {
  const dev = dut.device;
  const result: ExerciseResult = { writes: 0, refused: 0 };
  if (opts.config) {
    const hasIo = dev.bars.some((b) => b.kind === "io");
    await dut.writeConfig16(PciHeader.COMMAND, PciCommand.MEMORY | PciCommand.MASTER | PciCommand.SERR | PciCommand.PARITY | (hasIo ? PciCommand.IO : 0));
    await dut.writeConfig8(PciHeader.CACHE_LINE_SIZE, 0x10);
    await dut.writeConfig8(PciHeader.LATENCY_TIMER, 0x40);
    await dut.writeConfig8(PciHeader.INTERRUPT_LINE, 0x0b);
    let mem32 = 0xc000_0000n;
    let mem64 = 0x8_0000_0000n;
    let io = 0xc000n;
    const align = (at: bigint, size: bigint) => (at + size - 1n) & ~(size - 1n);
    for (const bar of dev.bars) {
      if (bar.kind === "io") {
        io = align(io, bar.size);
        await dut.writeConfig32(barOffset(bar.index), Number(io) | PciBaseAddress.SPACE_IO);
        io += bar.size;
      } else if (bar.kind === "mem32") {
        mem32 = align(mem32, bar.size);
        await dut.writeConfig32(barOffset(bar.index), Number(mem32));
        mem32 += bar.size;
      } else {
        mem64 = align(mem64, bar.size);
        await dut.writeConfig32(barOffset(bar.index), Number(mem64 & 0xffff_ffffn));
        await dut.writeConfig32(barOffset(bar.index + 1), Number(mem64 >> 32n));
        mem64 += bar.size;
      }
    }
    const caps = walkCapabilityList(await dut.readConfig());
    const msix = caps.find((c) => c.id === PciCapId.MSIX);
    const msi = caps.find((c) => c.id === PciCapId.MSI);
    if (msix) {
      await dut.writeConfig16(msix.offset + PciMsix.FLAGS, PciMsix.FLAGS_ENABLE);
    } else if (msi) {
      await dut.writeConfig32(msi.offset + PciMsi.ADDRESS_LO, 0xfee0_0000);
      await dut.writeConfig32(msi.offset + PciMsi.ADDRESS_HI, 0);
      await dut.writeConfig16(msi.offset + PciMsi.DATA_64, 0x4041);
      await dut.writeConfig16(msi.offset + PciMsi.FLAGS, PciMsi.FLAGS_ENABLE);
    }
  }
  const word = Buffer.alloc(4);
  word.writeUInt32LE(value >>> 0, 0);
  for (const bar of dev.bars) {
    const offsets = new Set<bigint>();
    const span = bar.size < BigInt(EXERCISE_SPAN) ? bar.size : BigInt(EXERCISE_SPAN);
    for (let o = 0n; o + 4n <= span; o += 4n) offsets.add(o);
    if (bar.size > BigInt(EXERCISE_SPAN)) {
      for (let k = 1n; k <= BigInt(EXERCISE_SPOTS); k++) offsets.add((k * bar.size) / BigInt(EXERCISE_SPOTS) - 4n);
    }
    for (const o of offsets) {
      result.writes++;
      try {
        await dut.client.regionWrite(bar.index, o, word);
      } catch (err) {
        if (!(err instanceof VfioUserError)) throw err;
        result.refused++;
      }
    }
  }
  return result;
}

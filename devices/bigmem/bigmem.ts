/**
 * `bigmem`: a device with a large memory BAR, made to exercise migration
 * pre-copy. BAR2 is plain device memory the guest reads and writes through
 * MMIO; BAR0 holds a DMA engine between that memory and guest RAM, a
 * checksum engine (so a test can check 256 MiB without reading it over
 * MMIO), and edu-style interrupt registers. The memory is migrated through
 * `precopyMemory` (page-granular dirty tracking); `saveState` carries only
 * the registers. INTx (pin A), one MSI vector, and three MSI-X vectors.
 *
 * Written only against the public device API.
 *
 * BAR0, 4 KiB mem32 registers. Every register is 32 bits wide; a 64-bit
 * register is two of them (low word first) and may also be accessed with
 * one 8-byte access at its base. Any 8-byte access at an 8-aligned offset
 * acts as two 4-byte accesses, low word first. Other sizes or misaligned
 * accesses read all ones and are ignored on write; so are reserved offsets.
 * Write-only registers read 0.
 *
 *   0x00  ID            RO   0xb16e0100: magic 0xb16e (bits 31:16), major
 *                            version (15:8) = 1, minor version (7:0) = 0
 *   0x08  MEM_SIZE      RO   u64: BAR2 size in bytes (0x08 low, 0x0c high)
 *   0x10  STATUS        RW   bit0 DMA busy (RO), bit1 DMA error (W1C),
 *                            bit2 checksum busy (RO), bit3 checksum error (W1C)
 *   0x14  GENERATION    RO   u32, +1 (wrapping) per successfully completed DMA
 *   0x18  IRQ_STATUS    RO   pending interrupt bits; 0x100 = DMA done,
 *                            0x200 = checksum done, others via IRQ_RAISE
 *   0x20  IRQ_RAISE     WO   OR the written bits into IRQ_STATUS and interrupt
 *   0x24  IRQ_ACK       WO   clear the written bits; INTx drops at zero
 *   0x40  DMA_GUEST     RW   u64 guest (IOVA) address
 *   0x48  DMA_OFFSET    RW   u64 offset in device memory
 *   0x50  DMA_LENGTH    RW   u64 byte count (0 completes at once)
 *   0x58  DMA_CMD       RW   bit0 start (reads 1 while busy), bit1 direction
 *                            (0 = guest RAM -> device memory, 1 = device
 *                            memory -> guest RAM), bit2 interrupt when done
 *   0x60  CSUM_OFFSET   RW   u64 offset in device memory
 *   0x68  CSUM_LENGTH   RW   u64 byte count
 *   0x70  CSUM_CMD      RW   bit0 start (reads 1 while busy), bit2 interrupt
 *                            when done
 *   0x74  CSUM_RESULT   RO   32-bit FNV-1a of the range (see `fnv1a32`)
 *   0xc00 MSI-X table   (3 entries, 48 bytes; served by the framework)
 *   0xe00 MSI-X PBA     (8 bytes; served by the framework)
 *
 * Interrupts. IRQ_STATUS collects the sources; how they are signalled
 * depends on what the guest enabled:
 * - INTx: the line is high while IRQ_STATUS is not 0;
 * - MSI: one message (vector 0) per raise;
 * - MSI-X: one message per source raised, on its own vector:
 *   vector 0 = bits raised through IRQ_RAISE, vector 1 = checksum done,
 *   vector 2 = DMA done (`BIGMEM_MSIX_VECTOR`). A driver that only wants the
 *   DMA interrupt programs vector 2 and leaves the others masked.
 *
 * DMA_* and CSUM_* parameter registers are ignored while their engine is
 * busy, and so is a start while busy. Starting an engine clears its error
 * bit. A range outside device memory (or a failed DMA) sets the error bit
 * and ends the command; the done interrupt is raised either way when asked
 * for, so a driver waiting for it wakes up. The engines run after the
 * register write has been answered, only while the device may run, DMA in
 * chunks of at most 1 MiB and the checksum in 4 MiB steps, and resume where
 * they stopped (also on a migration destination: DMA progress is part of
 * the saved state; a checksum in progress is restarted there).
 *
 * BAR2: mem64 prefetchable, `size` bytes (option, default 256 MiB). Guest
 * accesses of any size go straight to the backing memory.
 *
 * Reset returns the registers to power-on and clears device memory to zero,
 * like memory that lost power (a fresh zeroed allocation, so untouched pages
 * of a big BAR cost no resident memory).
 */
import { constants as bufferConstants } from "node:buffer";
import {
  defineOptions,
  parseOptions,
  type BarDefinition,
  type Device,
  type DeviceContext,
  type DeviceFactory,
  type DeviceOptions,
  type PrecopyMemory,
} from "../../src/index.ts";

/** Register offsets in BAR0. */
export const BigmemReg = {
  ID: 0x00,
  MEM_SIZE: 0x08,
  STATUS: 0x10,
  GENERATION: 0x14,
  IRQ_STATUS: 0x18,
  IRQ_RAISE: 0x20,
  IRQ_ACK: 0x24,
  DMA_GUEST: 0x40,
  DMA_OFFSET: 0x48,
  DMA_LENGTH: 0x50,
  DMA_CMD: 0x58,
  CSUM_OFFSET: 0x60,
  CSUM_LENGTH: 0x68,
  CSUM_CMD: 0x70,
  CSUM_RESULT: 0x74,
} as const;

export const BIGMEM_ID = 0xb16e0100;
export const BIGMEM_DEVICE_ID = 0xb16e;
export const BIGMEM_PAGE_SIZE = 4096;
export const BIGMEM_DEFAULT_SIZE = 256n << 20n;
/** State layout version; 2: config space gained the MSI-X capability. */
export const BIGMEM_STATE_VERSION = 2;

export const STATUS_DMA_BUSY = 0x1;
export const STATUS_DMA_ERROR = 0x2;
export const STATUS_CSUM_BUSY = 0x4;
export const STATUS_CSUM_ERROR = 0x8;
const STATUS_ERRORS = STATUS_DMA_ERROR | STATUS_CSUM_ERROR;

export const CMD_START = 0x1;
export const DMA_TO_GUEST = 0x2;
export const CMD_IRQ = 0x4;
const DMA_CMD_BITS = CMD_START | DMA_TO_GUEST | CMD_IRQ;
const CSUM_CMD_BITS = CMD_START | CMD_IRQ;

export const IRQ_DMA = 0x100;
export const IRQ_CSUM = 0x200;

/** The MSI-X vector of each interrupt source. */
export const BIGMEM_MSIX_VECTOR = { RAISE: 0, CSUM: 1, DMA: 2 } as const;
export const BIGMEM_MSIX_VECTORS = 3;
/** Where the MSI-X table and PBA sit in BAR0. */
export const BIGMEM_MSIX_TABLE = 0xc00;
export const BIGMEM_MSIX_PBA = 0xe00;

const BAR0_SIZE = 4096n;
const DMA_CHUNK = 1 << 20;
const CSUM_STEP = 4 << 20;
const U32_MAX = 0xffff_ffff;
const U64_MAX = (1n << 64n) - 1n;
const FNV_BASIS = 0x811c9dc5;
const FNV_PRIME = 0x01000193;

/** 32-bit FNV-1a over `bytes`, continuing from `hash` (the offset basis by default). */
export function fnv1a32(bytes: Uint8Array, hash: number = FNV_BASIS): number {
  let h = hash | 0;
  for (let i = 0; i < bytes.length; i++) h = Math.imul(h ^ bytes[i]!, FNV_PRIME);
  return h >>> 0;
}

/**
 * `--opt` keys: the size of device memory (BAR2), a power of two of at
 * least 4096 bytes that one Buffer can hold.
 */
export const BIGMEM_OPTIONS = defineOptions({
  size: {
    type: "size",
    powerOfTwo: true,
    min: BigInt(BIGMEM_PAGE_SIZE),
    max: BigInt(bufferConstants.MAX_LENGTH),
    default: BIGMEM_DEFAULT_SIZE,
    description: "device memory (BAR2)",
  },
});

/** The `size` option alone: `"64K"` -> 65536n (throws OptionError like `--opt size=...`). */
export function parseBigmemSize(text: string): bigint {
  return parseOptions("bigmem", BIGMEM_OPTIONS, { size: text }).size;
}

/** The registers: what `saveState` carries. */
interface BigmemRegs {
  memSize: bigint;
  /** Only the W1C error bits; the busy bits come from the commands. */
  status: number;
  generation: number;
  irqStatus: number;
  dmaGuest: bigint;
  dmaOffset: bigint;
  dmaLength: bigint;
  dmaCmd: number;
  /** Bytes of the DMA in progress already done (0 when idle). */
  dmaDone: number;
  csumOffset: bigint;
  csumLength: bigint;
  csumCmd: number;
  csumResult: number;
}

function powerOn(memSize: bigint): BigmemRegs {
  return {
    memSize,
    status: 0,
    generation: 0,
    irqStatus: 0,
    dmaGuest: 0n,
    dmaOffset: 0n,
    dmaLength: 0n,
    dmaCmd: 0,
    dmaDone: 0,
    csumOffset: 0n,
    csumLength: 0n,
    csumCmd: 0,
    csumResult: 0,
  };
}

/** Replace the low (hi = false) or high 32 bits of a u64. */
function setHalf(reg: bigint, hi: boolean, v: number): bigint {
  return hi ? (reg & 0xffff_ffffn) | (BigInt(v) << 32n) : (reg & ~0xffff_ffffn) | BigInt(v);
}

function half(reg: bigint, hi: boolean): number {
  return Number((hi ? reg >> 32n : reg) & 0xffff_ffffn);
}

export class BigmemDevice implements Device, PrecopyMemory {
  readonly type = "bigmem";
  readonly stateVersion = BIGMEM_STATE_VERSION;
  readonly identity = { vendorId: 0x1234, deviceId: BIGMEM_DEVICE_ID, classCode: 0x050000, revision: 1 };
  readonly interruptPin = 1;
  readonly capabilities = {
    msi: { vectors: 1 as const },
    msix: { vectors: BIGMEM_MSIX_VECTORS, tableBar: 0, tableOffset: BIGMEM_MSIX_TABLE, pbaBar: 0, pbaOffset: BIGMEM_MSIX_PBA },
  };
  readonly bars: readonly BarDefinition[];
  readonly precopyMemory: PrecopyMemory = this;

  readonly size: bigint;
  readonly pageSize = BIGMEM_PAGE_SIZE;
  private readonly pages: number;

  private ctx?: DeviceContext;
  private s: BigmemRegs;
  private mem: Buffer;

  private tracking = false;
  /** One bit per page, LSB first within each word. */
  private readonly dirty: Uint32Array;
  private dirtyCount = 0;

  /** Bumped by reset/loadState: an engine step from before drops its result. */
  private epoch = 0;
  private dmaScheduled = false;
  private dmaActive = false;
  private csumScheduled = false;
  /** Checksum progress: not migrated, a destination restarts the sum. */
  private csumDone = 0;
  private csumHash = FNV_BASIS;
  /** The INTx level last given to the framework; undefined after loadState. */
  private intxLine: boolean | undefined = false;

  constructor(options: DeviceOptions = {}) {
    this.size = parseOptions("bigmem", BIGMEM_OPTIONS, options).size;
    this.pages = Number(this.size / BigInt(BIGMEM_PAGE_SIZE));
    this.dirty = new Uint32Array(Math.ceil(this.pages / 32));
    this.mem = this.allocate();
    this.s = powerOn(this.size);
    this.bars = [
      {
        index: 0,
        size: BAR0_SIZE,
        kind: "mem32",
        read: (offset, data) => this.regRead(offset, data),
        write: (offset, data) => this.regWrite(offset, data),
      },
      {
        index: 2,
        size: this.size,
        kind: "mem64",
        prefetchable: true,
        read: (offset, data) => {
          this.mem.copy(data, 0, offset, offset + data.length);
        },
        write: (offset, data) => {
          data.copy(this.mem, offset);
          if (this.tracking) this.markDirty(offset, data.length);
        },
      },
    ];
  }

  private allocate(): Buffer {
    try {
      return Buffer.alloc(Number(this.size));
    } catch (err) {
      throw new Error(`bigmem: cannot allocate ${this.size} bytes of device memory: ${(err as Error).message}`);
    }
  }

  attach(ctx: DeviceContext): void {
    this.ctx = ctx;
  }

  reset(): void {
    this.epoch++;
    this.dmaActive = false;
    this.csumDone = 0;
    this.csumHash = FNV_BASIS;
    this.s = powerOn(this.size);
    this.mem = this.allocate();
    if (this.tracking) this.markAllDirty();
    this.setLine(false);
  }

  runStateChanged(running: boolean): void {
    if (!running) return; // the engines check ctx.running between steps
    // The INTx level is device state: after a migration the line comes back
    // up here (the framework re-fires a level it already knows by itself).
    const level = this.s.irqStatus !== 0;
    if (this.ctx && !this.messageSignalled() && this.intxLine !== level) this.setLine(level);
    this.kick();
  }

  saveState(): unknown {
    return { ...this.s };
  }

  loadState(state: unknown): void {
    if (typeof state !== "object" || state === null || Array.isArray(state)) {
      throw new Error("bigmem: state is not an object");
    }
    const o = state as Record<string, unknown>;
    const known = Object.keys(powerOn(0n));
    for (const key of Object.keys(o)) {
      if (!known.includes(key)) throw new Error(`bigmem: unknown field "${key}" in state`);
    }
    const u32 = (key: string, mask = U32_MAX): number => {
      const v = o[key];
      if (typeof v !== "number" || !Number.isInteger(v) || v < 0 || v > U32_MAX) {
        throw new Error(`bigmem: state field "${key}" is not a u32`);
      }
      if ((v & ~mask) !== 0) throw new Error(`bigmem: state field "${key}" has unknown bits 0x${v.toString(16)}`);
      return v;
    };
    const u64 = (key: string): bigint => {
      const v = o[key];
      if (typeof v === "bigint" && v >= 0n && v <= U64_MAX) return v;
      if (typeof v === "number" && Number.isSafeInteger(v) && v >= 0) return BigInt(v);
      throw new Error(`bigmem: state field "${key}" is not a u64`);
    };
    const memSize = u64("memSize");
    if (memSize !== this.size) {
      throw new Error(`bigmem: state is for ${memSize} bytes of device memory, this device has ${this.size}`);
    }
    const s: BigmemRegs = {
      memSize,
      status: u32("status", STATUS_ERRORS),
      generation: u32("generation"),
      irqStatus: u32("irqStatus"),
      dmaGuest: u64("dmaGuest"),
      dmaOffset: u64("dmaOffset"),
      dmaLength: u64("dmaLength"),
      dmaCmd: u32("dmaCmd", DMA_CMD_BITS),
      dmaDone: u32("dmaDone"),
      csumOffset: u64("csumOffset"),
      csumLength: u64("csumLength"),
      csumCmd: u32("csumCmd", CSUM_CMD_BITS),
      csumResult: u32("csumResult"),
    };
    const busy = (s.dmaCmd & CMD_START) !== 0;
    if (busy ? BigInt(s.dmaDone) > s.dmaLength : s.dmaDone !== 0) {
      throw new Error(`bigmem: DMA progress ${s.dmaDone} does not fit the DMA in the state`);
    }
    this.epoch++;
    this.dmaActive = false;
    this.csumDone = 0;
    this.csumHash = FNV_BASIS;
    this.intxLine = undefined;
    this.s = s;
    this.kick();
  }

  // --- BAR0 registers ---

  private regRead(offset: number, data: Buffer): void {
    if (data.length === 4 && offset % 4 === 0) {
      data.writeUInt32LE(this.readWord(offset), 0);
    } else if (data.length === 8 && offset % 8 === 0) {
      data.writeUInt32LE(this.readWord(offset), 0);
      data.writeUInt32LE(this.readWord(offset + 4), 4);
    } else {
      data.fill(0xff);
    }
  }

  private regWrite(offset: number, data: Buffer): void {
    if (data.length === 4 && offset % 4 === 0) {
      this.writeWord(offset, data.readUInt32LE(0));
    } else if (data.length === 8 && offset % 8 === 0) {
      this.writeWord(offset, data.readUInt32LE(0));
      this.writeWord(offset + 4, data.readUInt32LE(4));
    }
  }

  private readWord(offset: number): number {
    const s = this.s;
    const base = offset & ~7;
    const hi = (offset & 4) !== 0;
    switch (base) {
      case BigmemReg.MEM_SIZE: return half(s.memSize, hi);
      case BigmemReg.DMA_GUEST: return half(s.dmaGuest, hi);
      case BigmemReg.DMA_OFFSET: return half(s.dmaOffset, hi);
      case BigmemReg.DMA_LENGTH: return half(s.dmaLength, hi);
      case BigmemReg.CSUM_OFFSET: return half(s.csumOffset, hi);
      case BigmemReg.CSUM_LENGTH: return half(s.csumLength, hi);
    }
    switch (offset) {
      case BigmemReg.ID: return BIGMEM_ID;
      case BigmemReg.STATUS: return this.status();
      case BigmemReg.GENERATION: return s.generation;
      case BigmemReg.IRQ_STATUS: return s.irqStatus;
      case BigmemReg.IRQ_RAISE:
      case BigmemReg.IRQ_ACK:
        return 0;
      case BigmemReg.DMA_CMD: return s.dmaCmd;
      case BigmemReg.CSUM_CMD: return s.csumCmd;
      case BigmemReg.CSUM_RESULT: return s.csumResult;
      default: return U32_MAX;
    }
  }

  private writeWord(offset: number, v: number): void {
    const s = this.s;
    const base = offset & ~7;
    const hi = (offset & 4) !== 0;
    const dmaIdle = (s.dmaCmd & CMD_START) === 0;
    const csumIdle = (s.csumCmd & CMD_START) === 0;
    switch (base) {
      case BigmemReg.DMA_GUEST: if (dmaIdle) s.dmaGuest = setHalf(s.dmaGuest, hi, v); return;
      case BigmemReg.DMA_OFFSET: if (dmaIdle) s.dmaOffset = setHalf(s.dmaOffset, hi, v); return;
      case BigmemReg.DMA_LENGTH: if (dmaIdle) s.dmaLength = setHalf(s.dmaLength, hi, v); return;
      case BigmemReg.CSUM_OFFSET: if (csumIdle) s.csumOffset = setHalf(s.csumOffset, hi, v); return;
      case BigmemReg.CSUM_LENGTH: if (csumIdle) s.csumLength = setHalf(s.csumLength, hi, v); return;
    }
    switch (offset) {
      case BigmemReg.STATUS:
        s.status &= ~(v & STATUS_ERRORS);
        return;
      case BigmemReg.IRQ_RAISE:
        this.raise(v);
        return;
      case BigmemReg.IRQ_ACK:
        this.acknowledge(v);
        return;
      case BigmemReg.DMA_CMD:
        if (!dmaIdle || !(v & CMD_START)) return;
        s.dmaCmd = v & DMA_CMD_BITS;
        s.dmaDone = 0;
        s.status &= ~STATUS_DMA_ERROR;
        this.scheduleDma();
        return;
      case BigmemReg.CSUM_CMD:
        if (!csumIdle || !(v & CMD_START)) return;
        s.csumCmd = v & CSUM_CMD_BITS;
        s.status &= ~STATUS_CSUM_ERROR;
        this.csumDone = 0;
        this.csumHash = FNV_BASIS;
        this.scheduleCsum();
        return;
    }
  }

  private status(): number {
    let st = this.s.status;
    if (this.s.dmaCmd & CMD_START) st |= STATUS_DMA_BUSY;
    if (this.s.csumCmd & CMD_START) st |= STATUS_CSUM_BUSY;
    return st;
  }

  private raise(bits: number): void {
    this.s.irqStatus = (this.s.irqStatus | bits) >>> 0;
    if (this.s.irqStatus === 0 || !this.ctx) return;
    const irq = this.ctx.irq;
    if (irq.mode === "msix") {
      if (bits & ~(IRQ_DMA | IRQ_CSUM)) irq.notify(BIGMEM_MSIX_VECTOR.RAISE);
      if (bits & IRQ_CSUM) irq.notify(BIGMEM_MSIX_VECTOR.CSUM);
      if (bits & IRQ_DMA) irq.notify(BIGMEM_MSIX_VECTOR.DMA);
    } else if (irq.mode === "msi") {
      irq.notify(0);
    } else {
      this.setLine(true);
    }
  }

  private acknowledge(bits: number): void {
    this.s.irqStatus = (this.s.irqStatus & ~bits) >>> 0;
    if (this.s.irqStatus === 0 && this.ctx && !this.messageSignalled()) this.setLine(false);
  }

  /** MSI or MSI-X is on: interrupts are messages, the INTx line is not used. */
  private messageSignalled(): boolean {
    const mode = this.ctx?.irq.mode;
    return mode === "msi" || mode === "msix";
  }

  private setLine(level: boolean): void {
    if (!this.ctx) return;
    this.intxLine = level;
    this.ctx.irq.setLevel(level);
  }

  // --- engines ---

  private kick(): void {
    if (!this.ctx?.running) return;
    if (this.s.dmaCmd & CMD_START) this.scheduleDma();
    if (this.s.csumCmd & CMD_START) this.scheduleCsum();
  }

  private scheduleDma(): void {
    if (this.dmaScheduled || this.dmaActive) return;
    this.dmaScheduled = true;
    setImmediate(() => {
      this.dmaScheduled = false;
      this.runDma().catch((err: unknown) => this.ctx?.log.error({ err: (err as Error).message }, "bigmem: DMA engine fault"));
    });
  }

  /**
   * One DMA command, chunk by chunk. A chunk that completes after the
   * device stopped is not counted (nor, towards device memory, applied):
   * it is redone on resume, which is harmless as both directions only copy.
   */
  private async runDma(): Promise<void> {
    const ctx = this.ctx;
    if (!ctx?.running || this.dmaActive || !(this.s.dmaCmd & CMD_START)) return;
    const epoch = this.epoch;
    const s = this.s;
    this.dmaActive = true;
    try {
      const toGuest = (s.dmaCmd & DMA_TO_GUEST) !== 0;
      if (s.dmaOffset + s.dmaLength > this.size) {
        throw new Error(`device range 0x${s.dmaOffset.toString(16)}+0x${s.dmaLength.toString(16)} is outside ${this.size} bytes of memory`);
      }
      if (s.dmaGuest + s.dmaLength > U64_MAX + 1n) {
        throw new Error(`guest range 0x${s.dmaGuest.toString(16)}+0x${s.dmaLength.toString(16)} wraps around`);
      }
      const length = Number(s.dmaLength);
      const base = Number(s.dmaOffset);
      while (s.dmaDone < length) {
        if (!ctx.running) return; // resumed by runStateChanged(true)
        const at = base + s.dmaDone;
        const n = Math.min(DMA_CHUNK, length - s.dmaDone);
        const guest = s.dmaGuest + BigInt(s.dmaDone);
        if (toGuest) {
          await ctx.dma.write(guest, this.mem.subarray(at, at + n));
          if (epoch !== this.epoch || !ctx.running) return;
        } else {
          const bytes = await ctx.dma.read(guest, n);
          if (epoch !== this.epoch || !ctx.running) return;
          if (bytes.length !== n) throw new Error(`DMA read returned ${bytes.length} bytes, expected ${n}`);
          bytes.copy(this.mem, at);
          if (this.tracking) this.markDirty(at, n);
        }
        s.dmaDone += n;
      }
      this.finishDma(true);
    } catch (err) {
      if (epoch !== this.epoch) return;
      ctx.log.warn({ err: (err as Error).message }, "bigmem: DMA failed");
      this.finishDma(false);
    } finally {
      if (epoch === this.epoch) this.dmaActive = false;
    }
  }

  private finishDma(ok: boolean): void {
    const cmd = this.s.dmaCmd;
    this.s.dmaCmd &= ~CMD_START;
    this.s.dmaDone = 0;
    if (ok) this.s.generation = (this.s.generation + 1) >>> 0;
    else this.s.status |= STATUS_DMA_ERROR;
    if (cmd & CMD_IRQ) this.raise(IRQ_DMA);
  }

  private scheduleCsum(): void {
    if (this.csumScheduled) return;
    this.csumScheduled = true;
    setImmediate(() => {
      this.csumScheduled = false;
      this.stepCsum();
    });
  }

  /** One step of the checksum; reschedules itself so the event loop keeps turning. */
  private stepCsum(): void {
    const s = this.s;
    if (!this.ctx?.running || !(s.csumCmd & CMD_START)) return;
    try {
      if (s.csumOffset + s.csumLength > this.size) {
        throw new Error(`range 0x${s.csumOffset.toString(16)}+0x${s.csumLength.toString(16)} is outside ${this.size} bytes of memory`);
      }
      const length = Number(s.csumLength);
      const at = Number(s.csumOffset) + this.csumDone;
      const n = Math.min(CSUM_STEP, length - this.csumDone);
      this.csumHash = fnv1a32(this.mem.subarray(at, at + n), this.csumHash);
      this.csumDone += n;
      if (this.csumDone < length) {
        this.scheduleCsum();
        return;
      }
      s.csumResult = this.csumHash;
    } catch (err) {
      this.ctx.log.warn({ err: (err as Error).message }, "bigmem: checksum failed");
      s.csumResult = 0;
      s.status |= STATUS_CSUM_ERROR;
    }
    const cmd = s.csumCmd;
    s.csumCmd &= ~CMD_START;
    this.csumDone = 0;
    this.csumHash = FNV_BASIS;
    if (cmd & CMD_IRQ) this.raise(IRQ_CSUM);
  }

  // --- PrecopyMemory ---

  startTracking(): void {
    this.tracking = true;
    this.markAllDirty();
  }

  stopTracking(): void {
    this.tracking = false;
    this.dirty.fill(0);
    this.dirtyCount = 0;
  }

  /**
   * Every dirty page, ascending, in one array (the framework reads it at
   * once), and the bitmap cleared: a write after this marks the page again
   * for the next round. A tight loop over 32-page words, no per-page
   * iterator step: 256 MiB all dirty (65,536 pages) takes well under a
   * millisecond, so the stop-copy transition does not grow with it.
   */
  takeDirtyPages(): Iterable<number> {
    const words = this.dirty;
    let total = 0;
    for (let w = 0; w < words.length; w++) if (words[w] !== 0) total += popcount(words[w]!);
    const out = new Uint32Array(total);
    let n = 0;
    for (let w = 0; w < words.length; w++) {
      let bits = words[w]!;
      if (bits === 0) continue;
      words[w] = 0;
      const base = w * 32;
      if (bits === 0xffff_ffff) {
        for (let i = 0; i < 32; i++) out[n++] = base + i;
        continue;
      }
      while (bits !== 0) {
        const low = bits & -bits;
        bits = (bits ^ low) >>> 0;
        out[n++] = base + (31 - Math.clz32(low));
      }
    }
    this.dirtyCount = 0;
    return out;
  }

  dirtyPageCount(): number {
    return this.dirtyCount;
  }

  /** A view of the page, not a copy. */
  readPage(page: number): Uint8Array {
    const at = this.pageOffset(page);
    return this.mem.subarray(at, at + BIGMEM_PAGE_SIZE);
  }

  /**
   * Pages `first` .. `first + count - 1` as one view, not a copy. What the
   * API asks of it holds: while tracking, BAR2 writes, DMA into device
   * memory and reset all mark pages dirty (DMA results that arrive after
   * the device stopped are dropped), and dirtyPageCount() is exact.
   */
  readPages(first: number, count: number): Uint8Array {
    if (!Number.isInteger(count) || count < 1 || count > this.pages) {
      throw new RangeError(`bigmem: page count ${count} outside 1..${this.pages}`);
    }
    const at = this.pageOffset(first);
    this.pageOffset(first + count - 1);
    return this.mem.subarray(at, at + count * BIGMEM_PAGE_SIZE);
  }

  /** Whole pages in one copy (the destination's MEMORY records as they arrive). */
  writePages(first: number, data: Uint8Array): void {
    const count = data.length / BIGMEM_PAGE_SIZE;
    if (!Number.isInteger(count) || count < 1) {
      throw new RangeError(`bigmem: page data of ${data.length} bytes is not a whole number of ${BIGMEM_PAGE_SIZE}-byte pages`);
    }
    const at = this.pageOffset(first);
    this.pageOffset(first + count - 1);
    this.mem.set(data, at);
  }

  writePage(page: number, data: Uint8Array): void {
    const at = this.pageOffset(page);
    if (data.length !== BIGMEM_PAGE_SIZE) {
      throw new RangeError(`bigmem: page data of ${data.length} bytes, expected ${BIGMEM_PAGE_SIZE}`);
    }
    this.mem.set(data, at);
  }

  private pageOffset(page: number): number {
    if (!Number.isInteger(page) || page < 0 || page >= this.pages) {
      throw new RangeError(`bigmem: page ${page} outside 0..${this.pages - 1}`);
    }
    return page * BIGMEM_PAGE_SIZE;
  }

  private markAllDirty(): void {
    this.dirty.fill(U32_MAX);
    const tail = this.pages % 32;
    if (tail !== 0) this.dirty[this.dirty.length - 1] = (1 << tail) - 1;
    this.dirtyCount = this.pages;
  }

  private markDirty(offset: number, length: number): void {
    if (length === 0) return;
    const last = Math.floor((offset + length - 1) / BIGMEM_PAGE_SIZE);
    for (let p = Math.floor(offset / BIGMEM_PAGE_SIZE); p <= last; p++) {
      const w = p >>> 5;
      const bit = 1 << (p & 31);
      if ((this.dirty[w]! & bit) === 0) {
        this.dirty[w] = (this.dirty[w]! | bit) >>> 0;
        this.dirtyCount++;
      }
    }
  }
}

function popcount(v: number): number {
  v = v - ((v >>> 1) & 0x55555555);
  v = (v & 0x33333333) + ((v >>> 2) & 0x33333333);
  return (Math.imul((v + (v >>> 4)) & 0x0f0f0f0f, 0x01010101) >>> 24);
}

export const bigmemFactory: DeviceFactory = {
  name: "bigmem",
  description:
    "Large device memory for migration pre-copy tests: BAR2 memory, BAR0 DMA engine, FNV-1a checksum, interrupts",
  options: BIGMEM_OPTIONS,
  create: (options) => new BigmemDevice(options),
};

/**
 * The `edu` educational device, register-compatible with QEMU's
 * (docs/specs/edu.rst): identification, liveness, factorial with its
 * interrupt, interrupt raise/acknowledge, and a DMA engine between a 4 KiB
 * buffer and guest memory. INTx (pin A) and one MSI vector.
 *
 * Written only against the public device API, as a device developer outside
 * the project would write it.
 */
import { defineOptions, parseOptions, type BarDefinition, type Device, type DeviceContext, type DeviceFactory, type DeviceOptions } from "../../src/index.ts";

/** `--opt` keys: the DMA address mask, 28 bits by default like the C device's dma_mask. */
export const EDU_OPTIONS = defineOptions({
  "dma-mask": { type: "bigint", min: 1n, max: (1n << 64n) - 1n, default: (1n << 28n) - 1n, description: "DMA addresses the engine accepts (address & ~mask must be 0)" },
});

const REG_ID = 0x00;
const REG_LIVENESS = 0x04;
const REG_FACTORIAL = 0x08;
const REG_STATUS = 0x20;
const REG_IRQ_STATUS = 0x24;
const REG_IRQ_RAISE = 0x60;
const REG_IRQ_ACK = 0x64;
const REG_DMA_SRC = 0x80;
const REG_DMA_DST = 0x88;
const REG_DMA_COUNT = 0x90;
const REG_DMA_CMD = 0x98;

const STATUS_COMPUTING = 0x01;
const STATUS_IRQFACT = 0x80;
const DMA_RUN = 0x1;
const DMA_TO_RAM = 0x2;
const DMA_IRQ = 0x4;
const IRQ_FACT = 0x1;
const IRQ_DMA = 0x100;

/** The DMA buffer's address as the device's DMA engine sees it. */
export const EDU_DMA_BUFFER = 0x40000n;
export const EDU_DMA_SIZE = 4096;
export const EDU_ID = 0x010000ed;

interface EduState {
  liveness: number;
  factorial: number;
  status: number;
  irqStatus: number;
  dmaSrc: bigint;
  dmaDst: bigint;
  dmaCount: bigint;
  dmaCmd: number;
  buffer: Uint8Array;
}

function powerOn(): EduState {
  return {
    liveness: 0,
    factorial: 0,
    status: 0,
    irqStatus: 0,
    dmaSrc: 0n,
    dmaDst: 0n,
    dmaCount: 0n,
    dmaCmd: 0,
    buffer: new Uint8Array(EDU_DMA_SIZE),
  };
}

/** u32 factorial with wrap-around, as the C device computes it. */
export function eduFactorial(n: number): number {
  // 34! has 2^32 as a factor, so every n >= 34 gives 0: no loop of 2^32 steps
  if (n >= 34) return 0;
  let r = 1;
  for (let i = n; i > 1; i--) r = Math.imul(r, i) >>> 0;
  return r >>> 0;
}

export class EduDevice implements Device {
  readonly type = "edu";
  readonly stateVersion = 1;
  readonly identity = { vendorId: 0x1234, deviceId: 0x11e8, classCode: 0x00ff00, revision: 0x10 };
  readonly interruptPin = 1;
  readonly capabilities = { msi: { vectors: 1 as const } };
  readonly bars: readonly BarDefinition[];

  private ctx!: DeviceContext;
  private s: EduState = powerOn();
  /** 28 bits by default, like the C device's dma_mask. */
  private readonly dmaMask: bigint;
  private workScheduled = false;

  constructor(options: DeviceOptions = {}) {
    this.dmaMask = parseOptions("edu", EDU_OPTIONS, options)["dma-mask"];
    this.bars = [
      {
        index: 0,
        size: 1n << 20n,
        kind: "mem32",
        read: (offset, data) => this.mmioRead(offset, data),
        write: (offset, data) => this.mmioWrite(offset, data),
      },
    ];
  }

  attach(ctx: DeviceContext): void {
    this.ctx = ctx;
  }

  reset(): void {
    this.s = powerOn();
  }

  runStateChanged(running: boolean): void {
    if (!running) return;
    // after a migration the line level is ours to restore: it is part of our state
    if (this.s.irqStatus !== 0 && this.ctx.irq.mode !== "msi") this.ctx.irq.setLevel(true);
    this.scheduleWork();
  }

  saveState(): unknown {
    return { ...this.s, buffer: this.s.buffer.slice() };
  }

  loadState(state: unknown): void {
    const s = state as EduState;
    const buffer = s.buffer instanceof Uint8Array ? s.buffer : new Uint8Array(0);
    if (buffer.length !== EDU_DMA_SIZE) throw new Error(`edu: DMA buffer of ${buffer.length} bytes in state`);
    this.s = {
      liveness: s.liveness >>> 0,
      factorial: s.factorial >>> 0,
      status: s.status & (STATUS_COMPUTING | STATUS_IRQFACT),
      irqStatus: s.irqStatus >>> 0,
      dmaSrc: BigInt(s.dmaSrc),
      dmaDst: BigInt(s.dmaDst),
      dmaCount: BigInt(s.dmaCount),
      dmaCmd: s.dmaCmd & 0x7,
      buffer: buffer.slice(),
    };
  }

  private mmioRead(offset: number, data: Buffer): void {
    const size = data.length;
    if (!this.sizeOk(offset, size)) {
      data.fill(0xff);
      return;
    }
    let value: bigint;
    switch (offset) {
      case REG_ID: value = BigInt(EDU_ID); break;
      case REG_LIVENESS: value = BigInt(this.s.liveness); break;
      case REG_FACTORIAL: value = BigInt(this.s.factorial); break;
      case REG_STATUS: value = BigInt(this.s.status); break;
      case REG_IRQ_STATUS: value = BigInt(this.s.irqStatus); break;
      case REG_DMA_SRC: value = this.s.dmaSrc; break;
      case REG_DMA_DST: value = this.s.dmaDst; break;
      case REG_DMA_COUNT: value = this.s.dmaCount; break;
      case REG_DMA_CMD: value = BigInt(this.s.dmaCmd); break;
      default: value = (1n << 64n) - 1n;
    }
    if (size === 4) data.writeUInt32LE(Number(value & 0xffff_ffffn), 0);
    else data.writeBigUInt64LE(value, 0);
  }

  private mmioWrite(offset: number, data: Buffer): void {
    const size = data.length;
    if (!this.sizeOk(offset, size)) return;
    const value = size === 4 ? BigInt(data.readUInt32LE(0)) : data.readBigUInt64LE(0);
    const v32 = Number(value & 0xffff_ffffn);
    switch (offset) {
      case REG_LIVENESS:
        this.s.liveness = ~v32 >>> 0;
        break;
      case REG_FACTORIAL:
        if (this.s.status & STATUS_COMPUTING) break;
        this.s.factorial = v32;
        this.s.status |= STATUS_COMPUTING;
        this.scheduleWork();
        break;
      case REG_STATUS:
        this.s.status = (this.s.status & ~STATUS_IRQFACT) | (v32 & STATUS_IRQFACT);
        break;
      case REG_IRQ_RAISE:
        this.raise(v32);
        break;
      case REG_IRQ_ACK:
        this.acknowledge(v32);
        break;
      case REG_DMA_SRC:
        if (!(this.s.dmaCmd & DMA_RUN)) this.s.dmaSrc = value;
        break;
      case REG_DMA_DST:
        if (!(this.s.dmaCmd & DMA_RUN)) this.s.dmaDst = value;
        break;
      case REG_DMA_COUNT:
        if (!(this.s.dmaCmd & DMA_RUN)) this.s.dmaCount = value;
        break;
      case REG_DMA_CMD:
        if (!(v32 & DMA_RUN) || this.s.dmaCmd & DMA_RUN) break;
        this.s.dmaCmd = v32 & 0x7;
        this.scheduleWork();
        break;
    }
  }

  private sizeOk(offset: number, size: number): boolean {
    return offset < 0x80 ? size === 4 : size === 4 || size === 8;
  }

  private raise(bits: number): void {
    this.s.irqStatus = (this.s.irqStatus | bits) >>> 0;
    if (this.s.irqStatus === 0) return;
    if (this.ctx.irq.mode === "msi") this.ctx.irq.notify(0);
    else this.ctx.irq.setLevel(true);
  }

  private acknowledge(bits: number): void {
    this.s.irqStatus = (this.s.irqStatus & ~bits) >>> 0;
    if (this.s.irqStatus === 0 && this.ctx.irq.mode !== "msi") this.ctx.irq.setLevel(false);
  }

  /**
   * Factorial and DMA run after the register write has been answered (the C
   * device uses a thread and a timer), and only while the device may run.
   */
  private scheduleWork(): void {
    if (this.workScheduled) return;
    this.workScheduled = true;
    setImmediate(() => {
      this.workScheduled = false;
      void this.doWork();
    });
  }

  private async doWork(): Promise<void> {
    if (!this.ctx.running) return; // resumed by runStateChanged(true)
    if (this.s.status & STATUS_COMPUTING) {
      this.s.factorial = eduFactorial(this.s.factorial);
      this.s.status &= ~STATUS_COMPUTING;
      if (this.s.status & STATUS_IRQFACT) this.raise(IRQ_FACT);
    }
    if (this.s.dmaCmd & DMA_RUN) await this.runDma();
  }

  private async runDma(): Promise<void> {
    const cmd = this.s.dmaCmd;
    const count = this.s.dmaCount;
    const toRam = (cmd & DMA_TO_RAM) !== 0;
    const local = toRam ? this.s.dmaSrc : this.s.dmaDst;
    const remote = (toRam ? this.s.dmaDst : this.s.dmaSrc) & this.dmaMask;
    try {
      if (local < EDU_DMA_BUFFER || local + count > EDU_DMA_BUFFER + BigInt(EDU_DMA_SIZE)) {
        throw new Error(`DMA range 0x${local.toString(16)}+0x${count.toString(16)} outside the 4 KiB buffer`);
      }
      const at = Number(local - EDU_DMA_BUFFER);
      const n = Number(count);
      if (toRam) {
        await this.ctx.dma.write(remote, this.s.buffer.subarray(at, at + n));
      } else {
        const bytes = await this.ctx.dma.read(remote, n);
        this.s.buffer.set(bytes, at);
      }
    } catch (err) {
      this.ctx.log.warn({ err: (err as Error).message }, "edu: DMA failed");
    }
    this.s.dmaCmd &= ~DMA_RUN;
    if (cmd & DMA_IRQ) this.raise(IRQ_DMA);
  }
}

export const eduFactory: DeviceFactory = {
  name: "edu",
  description: "QEMU's edu educational device: factorial, interrupts, DMA",
  options: EDU_OPTIONS,
  create: (options) => new EduDevice(options),
};

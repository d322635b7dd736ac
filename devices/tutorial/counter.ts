/**
 * The tutorial device: a 32-bit counter with an alarm interrupt and a DMA
 * "report". devices/tutorial/README.md builds this file step by step.
 *
 * BAR0, 32-bit registers: 0x00 ID (0xc0de0001), 0x04 COUNT, 0x08 ADD (COUNT += value), 0x0c ALARM,
 * 0x10 IRQ_STATUS (write 1 to clear), 0x14/0x18 REPORT_LO/HI (guest address), 0x1c REPORT (bit 0: go).
 */
import { defineOptions, parseOptions, readState, type BarDefinition, type Device, type DeviceContext, type DeviceFactory, type StateValue } from "../../src/index.ts";

export const REG = { ID: 0x00, COUNT: 0x04, ADD: 0x08, ALARM: 0x0c, IRQ_STATUS: 0x10, REPORT_LO: 0x14, REPORT_HI: 0x18, REPORT: 0x1c } as const;
export const COUNTER_ID = 0xc0de0001;
export const IRQ_ALARM = 0x1; // IRQ_STATUS bits
export const IRQ_REPORT = 0x2;

/** What saveState returns and loadState takes back: everything the guest can observe. */
interface CounterState {
  count: number;
  alarm: number;
  irqStatus: number;
  reportAddress: bigint;
  /** A REPORT was asked for and has not completed (done again on a migration destination). */
  reportPending: boolean;
}

const powerOn = (start: number): CounterState => ({ count: start, alarm: 0, irqStatus: 0, reportAddress: 0n, reportPending: false });

export class CounterDevice implements Device {
  readonly type = "counter";
  readonly stateVersion = 1;
  readonly identity = { vendorId: 0x1234, deviceId: 0xc0de, classCode: 0xff0000, revision: 1 };
  readonly interruptPin = 1; // INTA#
  readonly capabilities = { msi: { vectors: 1 as const } };
  readonly bars: readonly BarDefinition[] = [
    { index: 0, size: 4096n, kind: "mem32", read: (o, d) => this.read(o, d), write: (o, d) => this.write(o, d) },
  ];

  private ctx!: DeviceContext;
  private s: CounterState;

  constructor(private readonly start = 0) {
    this.s = powerOn(start);
  }

  attach(ctx: DeviceContext): void {
    this.ctx = ctx;
  }

  private read(offset: number, data: Buffer): void {
    if (data.length !== 4 || offset % 4 !== 0) return void data.fill(0xff);
    data.writeUInt32LE(this.register(offset));
  }

  private register(offset: number): number {
    const s = this.s;
    switch (offset) {
      case REG.ID: return COUNTER_ID;
      case REG.COUNT: return s.count;
      case REG.ALARM: return s.alarm;
      case REG.IRQ_STATUS: return s.irqStatus;
      case REG.REPORT_LO: return Number(s.reportAddress & 0xffff_ffffn);
      case REG.REPORT_HI: return Number(s.reportAddress >> 32n);
      default: return 0; // write-only and unused registers read 0
    }
  }

  private write(offset: number, data: Buffer): void {
    if (data.length !== 4 || offset % 4 !== 0) return;
    const v = data.readUInt32LE(0);
    const s = this.s;
    switch (offset) {
      case REG.COUNT: s.count = v; return this.checkAlarm();
      case REG.ADD: s.count = (s.count + v) >>> 0; return this.checkAlarm();
      case REG.ALARM: s.alarm = v; return this.checkAlarm();
      case REG.IRQ_STATUS: s.irqStatus &= ~v; return this.updateLine();
      case REG.REPORT_LO: s.reportAddress = (s.reportAddress & 0xffff_ffff_0000_0000n) | BigInt(v); return;
      case REG.REPORT_HI: s.reportAddress = (s.reportAddress & 0xffff_ffffn) | (BigInt(v) << 32n); return;
      case REG.REPORT: if (v & 1 && !s.reportPending) { s.reportPending = true; void this.report(); }
    }
  }

  private checkAlarm(): void {
    if (this.s.alarm !== 0 && this.s.count >= this.s.alarm && !(this.s.irqStatus & IRQ_ALARM)) this.raise(IRQ_ALARM);
  }

  private raise(bits: number): void {
    this.s.irqStatus |= bits;
    if (this.ctx.irq.mode === "msi") this.ctx.irq.notify(0);
    this.updateLine();
  }

  /** The INTx line follows IRQ_STATUS (level-triggered); with MSI it stays low. */
  private updateLine(): void {
    this.ctx.irq.setLevel(this.s.irqStatus !== 0 && this.ctx.irq.mode === "intx");
  }

  private async report(): Promise<void> {
    const s = this.s;
    if (!s.reportPending || !this.ctx.running) return; // stopped: runStateChanged(true) calls again
    const record = Buffer.alloc(8);
    record.writeUInt32LE(s.count, 0);
    record.writeUInt32LE(s.alarm, 4);
    try {
      await this.ctx.dma.write(s.reportAddress, record);
    } catch (err) {
      this.ctx.log.warn({ err: (err as Error).message }, "counter: report DMA failed");
    }
    // reset or loadState replaced the state meanwhile, or the device stopped: not done (yet)
    if (this.s !== s || !s.reportPending || !this.ctx.running) return;
    s.reportPending = false;
    this.raise(IRQ_REPORT);
  }

  reset(): void {
    this.s = powerOn(this.start);
  }

  runStateChanged(running: boolean): void {
    if (!running) return;
    this.updateLine(); // after a migration, the line comes from the loaded IRQ_STATUS
    void this.report(); // a report cut short by a stop, or loaded pending, is done now
  }

  saveState(): StateValue {
    return { ...this.s };
  }

  loadState(state: StateValue): void {
    const r = readState("counter", state);
    this.s = {
      count: r.u32("count"),
      alarm: r.u32("alarm"),
      irqStatus: r.u32("irqStatus", IRQ_ALARM | IRQ_REPORT),
      reportAddress: r.u64("reportAddress"),
      reportPending: r.bool("reportPending"),
    };
    r.end();
  }
}

const options = defineOptions({ start: { type: "integer", min: 0, max: 0xffff_ffff, default: 0, description: "COUNT at power-on" } });

export const counterFactory: DeviceFactory = {
  name: "counter",
  description: "The tutorial device: a counter with an alarm interrupt and a DMA report",
  options,
  create: (raw) => new CounterDevice(parseOptions("counter", options, raw).start),
};

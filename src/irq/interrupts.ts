/**
 * Interrupt delivery: the eventfds the client registered with SET_IRQS, the
 * VFIO mask state, and the device-facing `Interrupts` (INTx level, MSI/MSI-X
 * messages). The guest-visible masking of MSI and MSI-X vectors is the
 * client's job (QEMU emulates the MSI-X table and the MSI mask bits and
 * holds masked interrupts pending), so a message is sent whenever an eventfd
 * is registered and the vector is not VFIO-masked.
 */
import { writeSync } from "node:fs";
import type { Logger } from "pino";
import type { InterruptMode, Interrupts } from "../device/api.ts";
import { IrqIndex } from "../../protocol/constants.ts";
import { fail } from "../../protocol/errors.ts";

/** What the controller needs to know of config space. */
export interface InterruptConfigView {
  readonly msi: { enabled: boolean } | null;
  readonly msix: { enabled: boolean } | null;
  readonly intxDisabled: boolean;
  setInterruptStatus(asserted: boolean): void;
}

const EVENTFD_ONE = Buffer.from([1, 0, 0, 0, 0, 0, 0, 0]);

export class InterruptController implements Interrupts {
  /** Per IRQ index, per vector: the eventfd, or -1. */
  private readonly fds: number[][];
  private readonly masked: boolean[][];
  private intxLevel = false;
  /** Deliveries counted per index, for tests and the trace log. */
  readonly delivered = [0, 0, 0, 0, 0];
  /** Injected faults (serve --fault irq=...): ms to hold a signal, Infinity to lose it, undefined to send it. */
  hold: ((index: number, vector: number) => number | undefined) | null = null;

  constructor(
    /** Vectors per IRQ index (GET_IRQ_INFO count). */
    readonly counts: readonly number[],
    private readonly config: InterruptConfigView,
    private readonly hasPin: boolean,
    private readonly running: () => boolean,
    private readonly log: Logger,
    private readonly closeFd: (fd: number) => void,
  ) {
    this.fds = counts.map((n) => new Array<number>(n).fill(-1));
    this.masked = counts.map((n) => new Array<boolean>(n).fill(false));
  }

  get mode(): InterruptMode {
    if (this.config.msix?.enabled) return "msix";
    if (this.config.msi?.enabled) return "msi";
    return this.hasPin ? "intx" : "none";
  }

  setLevel(asserted: boolean): void {
    this.intxLevel = asserted;
    this.config.setInterruptStatus(asserted);
    if (asserted) this.fireIntx();
  }

  notify(vector = 0): boolean {
    const mode = this.mode;
    if (mode !== "msi" && mode !== "msix") return false;
    const index = mode === "msi" ? IrqIndex.MSI : IrqIndex.MSIX;
    if (vector < 0 || vector >= this.counts[index]!) return false;
    if (!this.running() || this.masked[index]![vector]) return false;
    return this.signal(index, vector);
  }

  /** Re-check INTx after something that may let it through (unmask, command write, resume). */
  reevaluate(): void {
    if (this.intxLevel) this.fireIntx();
  }

  // ---- SET_IRQS actions (validated ranges come from the handler) ----

  checkRange(index: number, start: number, count: number): void {
    const n = this.counts[index];
    if (n === undefined) throw fail.inval(`IRQ index ${index} does not exist`);
    if (start + count > n || start < 0 || count < 0) {
      throw fail.inval(`IRQ index ${index}: vectors ${start}..${start + count - 1} exceed count ${n}`);
    }
  }

  /** ACTION_TRIGGER + DATA_EVENTFD: install fds (-1 unassigns); replaced fds are closed. */
  setEventfds(index: number, start: number, fds: readonly number[]): void {
    this.checkRange(index, start, fds.length);
    for (let i = 0; i < fds.length; i++) {
      const old = this.fds[index]![start + i]!;
      if (old >= 0 && old !== fds[i]) this.closeFd(old);
      this.fds[index]![start + i] = fds[i]!;
    }
    if (index === IrqIndex.INTX) this.reevaluate();
  }

  /** ACTION_TRIGGER + DATA_NONE with count 0: tear the whole index down. */
  disableIndex(index: number): void {
    this.checkRange(index, 0, 0);
    const row = this.fds[index]!;
    for (let v = 0; v < row.length; v++) {
      if (row[v]! >= 0) this.closeFd(row[v]!);
      row[v] = -1;
    }
  }

  /** ACTION_TRIGGER with DATA_NONE/DATA_BOOL: a loopback trigger from the client. */
  trigger(index: number, start: number, which: readonly boolean[]): void {
    this.checkRange(index, start, which.length);
    for (let i = 0; i < which.length; i++) if (which[i]) this.signal(index, start + i);
  }

  /** ACTION_MASK / ACTION_UNMASK with DATA_NONE/DATA_BOOL. */
  setMasked(index: number, start: number, which: readonly boolean[], mask: boolean): void {
    this.checkRange(index, start, which.length);
    for (let i = 0; i < which.length; i++) {
      if (which[i]) this.masked[index]![start + i] = mask;
    }
    if (!mask && index === IrqIndex.INTX) this.reevaluate();
  }

  /** Client gone: close every eventfd it gave us; masks back to their defaults. */
  releaseAll(): void {
    for (let index = 0; index < this.fds.length; index++) {
      this.disableIndex(index);
      this.masked[index]!.fill(false);
    }
  }

  /** Device reset: masks cleared, INTx low; the client's eventfds stay registered. */
  reset(): void {
    for (const row of this.masked) row.fill(false);
    this.intxLevel = false;
    this.config.setInterruptStatus(false);
  }

  eventfd(index: number, vector: number): number {
    return this.fds[index]?.[vector] ?? -1;
  }

  isMasked(index: number, vector: number): boolean {
    return this.masked[index]?.[vector] ?? false;
  }

  private fireIntx(): void {
    if (this.mode !== "intx" || this.config.intxDisabled || !this.running()) return;
    if (this.masked[IrqIndex.INTX]![0]) return;
    if (this.signal(IrqIndex.INTX, 0)) {
      // spec (VFIO): INTx is automasked; the client unmasks after the guest acknowledges
      this.masked[IrqIndex.INTX]![0] = true;
    }
  }

  private signal(index: number, vector: number): boolean {
    if (this.hold !== null) {
      const ms = this.hold(index, vector);
      if (ms !== undefined) {
        // the eventfd is looked up when the time comes: the client may have replaced it meanwhile
        if (ms !== Infinity) setTimeout(() => this.write(index, vector), ms).unref();
        return true;
      }
    }
    return this.write(index, vector);
  }

  private write(index: number, vector: number): boolean {
    const fd = this.fds[index]![vector]!;
    if (fd < 0) return false;
    try {
      writeSync(fd, EVENTFD_ONE);
    } catch (err) {
      this.log.warn({ err, index, vector }, "eventfd write failed");
      return false;
    }
    this.delivered[index]!++;
    return true;
  }
}

/**
 * Interrupt delivery: the eventfds the client registered with SET_IRQS, the
 * VFIO mask state, and the device-facing `Interrupts` (INTx level, MSI/MSI-X
 * messages). The guest-visible masking of MSI and MSI-X vectors is the
 * client's job (QEMU emulates the MSI-X table and the MSI mask bits and
 * holds masked interrupts pending), so a message is sent whenever an eventfd
 * is registered and the vector is not VFIO-masked.
 *
 * MSI-X vectors without an eventfd: QEMU gives a vector its eventfd when
 * the guest unmasks it and takes it away (SET_IRQS without fds) for vectors
 * it does not use, so "no eventfd" is the server's view of "masked". An
 * interrupt on such a vector sets its bit in the function's PBA (PCI 3.0,
 * 6.8.2.9: a masked vector's message is held pending), and the message is
 * sent once the vector gets an eventfd. QEMU shows the guest the device's
 * PBA while it holds nothing pending itself (its own PBA emulation is on
 * only while a vector it set up fired masked).
 *
 * Eventfd writes never block: the SET_IRQS handler makes every eventfd it
 * takes O_NONBLOCK, so a counter at its maximum (2^64 - 2, a client that
 * never reads, or one that preset it) fails with EAGAIN instead of stopping
 * the event loop. A loopback trigger (SET_IRQS from the client) that cannot
 * be delivered is refused with that errno; a device interrupt that cannot
 * be delivered is counted (`undelivered`) and logged, rate limited.
 */
import { writeSync } from "node:fs";
import type { Logger } from "pino";
import type { InterruptMode, Interrupts } from "../device/api.ts";
import { Errno, IrqIndex } from "../../protocol/constants.ts";
import { VfioUserError, fail } from "../../protocol/errors.ts";

/** A log line the client can provoke at will (rate limited by the connection). */
export type LimitedLog = (level: "debug" | "info" | "warn" | "error", fields: Record<string, unknown>, msg: string) => void;

/** The MSI-X Pending Bit Array (src/pci/msix-table.ts). */
export interface MsixPendingBits {
  setPending(vector: number, on: boolean): void;
  isPending(vector: number): boolean;
}

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
  /** INTx was signalled and auto-masked, and the client has not unmasked it yet: the client holds it (its line is up). */
  private intxHeld = false;
  /** Destination of a migration: the source's client held INTx; signal once when the device runs (see adoptHeldIntx). */
  private resignalIntx = false;
  /** Deliveries counted per index, for tests and the trace log. */
  readonly delivered = [0, 0, 0, 0, 0];
  /** Device interrupts whose eventfd write failed (EAGAIN: counter full), per index. */
  readonly undelivered = [0, 0, 0, 0, 0];
  /** Where warnings about undeliverable interrupts go: the client's rate-limited log while one is attached. */
  logLimited: LimitedLog | null = null;
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
    /** The function's MSI-X PBA, when it has MSI-X. */
    private readonly msixPba: MsixPendingBits | null = null,
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
    if (!Number.isInteger(vector) || vector < 0 || vector >= this.counts[index]!) return false;
    if (!this.running() || this.masked[index]![vector]) return false;
    if (index === IrqIndex.MSIX && this.fds[index]![vector]! < 0 && this.msixPba) {
      // no eventfd: the client has the vector masked; hold it pending
      this.msixPba.setPending(vector, true);
      return false;
    }
    return this.deviceSignal(index, vector);
  }

  /** Re-check INTx and held MSI-X messages after something that may let them through (unmask, command write, resume). */
  reevaluate(): void {
    if (this.resignalIntx && this.running()) this.resignalHeldIntx();
    if (this.intxLevel) this.fireIntx();
    this.sendPending(0, this.counts[IrqIndex.MSIX]!);
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
    if (index === IrqIndex.MSIX) this.sendPending(start, fds.length);
  }

  /** MSI-X vectors that fired while they had no eventfd and now have one: their message goes out now. */
  private sendPending(start: number, count: number): void {
    const pba = this.msixPba;
    if (!pba || !this.running() || this.mode !== "msix") return;
    for (let v = start; v < start + count; v++) {
      if (this.fds[IrqIndex.MSIX]![v]! >= 0 && pba.isPending(v)) {
        pba.setPending(v, false);
        this.deviceSignal(IrqIndex.MSIX, v);
      }
    }
  }

  /** ACTION_TRIGGER + DATA_EVENTFD without fds: vectors [start, start + count) lose their eventfds. */
  clearEventfds(index: number, start: number, count: number): void {
    this.checkRange(index, start, count);
    const row = this.fds[index]!;
    for (let v = start; v < start + count; v++) {
      if (row[v]! >= 0) this.closeFd(row[v]!);
      row[v] = -1;
    }
  }

  /** ACTION_TRIGGER + DATA_NONE with count 0: tear the whole index down. */
  disableIndex(index: number): void {
    this.checkRange(index, 0, 0);
    this.clearEventfds(index, 0, this.counts[index]!);
  }

  /**
   * ACTION_TRIGGER with DATA_NONE/DATA_BOOL: a loopback trigger from the
   * client. Every vector asked for is tried; if an eventfd could not take
   * its write, the request fails with that errno (EAGAIN: counter full).
   */
  trigger(index: number, start: number, which: readonly boolean[]): void {
    this.checkRange(index, start, which.length);
    let failed: { vector: number; errno: number } | null = null;
    for (let i = 0; i < which.length; i++) {
      if (!which[i]) continue;
      const errno = this.signal(index, start + i);
      if (errno > 0) failed ??= { vector: start + i, errno };
    }
    if (failed) throw new VfioUserError(failed.errno, `IRQ index ${index} vector ${failed.vector}: eventfd write failed (${failed.errno === Errno.EAGAIN ? "counter full" : `errno ${failed.errno}`})`);
  }

  /** ACTION_MASK / ACTION_UNMASK with DATA_NONE/DATA_BOOL. */
  setMasked(index: number, start: number, which: readonly boolean[], mask: boolean): void {
    this.checkRange(index, start, which.length);
    for (let i = 0; i < which.length; i++) {
      if (which[i]) this.masked[index]![start + i] = mask;
    }
    if (!mask && index === IrqIndex.INTX && which[0] && start === 0) this.intxHeld = false;
    if (!mask && index === IrqIndex.INTX) this.reevaluate();
  }

  /** Client gone: close every eventfd it gave us; masks back to their defaults. */
  releaseAll(): void {
    for (let index = 0; index < this.fds.length; index++) {
      this.disableIndex(index);
      this.masked[index]!.fill(false);
    }
    this.intxHeld = false;
    this.resignalIntx = false;
  }

  /** Device reset: masks cleared, INTx low; the client's eventfds stay registered. */
  reset(): void {
    for (const row of this.masked) row.fill(false);
    this.intxHeld = false;
    this.resignalIntx = false;
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
    if (this.deviceSignal(IrqIndex.INTX, 0)) {
      // spec (VFIO): INTx is automasked; the client unmasks after the guest acknowledges
      this.masked[IrqIndex.INTX]![0] = true;
      this.intxHeld = true;
    }
  }

  /**
   * Migration source: whether the client holds an INTx it has not
   * acknowledged (signalled, auto-masked, no UNMASK since). It travels in the
   * state stream.
   */
  get clientHoldsIntx(): boolean {
    return this.intxHeld && this.mode === "intx";
  }

  /**
   * Migration destination: the source's client held INTx when the device
   * stopped. A client that migrates its PCI state restores that line as
   * asserted, but not its record of having taken the interrupt (QEMU moves
   * the PCI irq_state, not vfio's INTx "pending" flag), so it would keep the
   * line up until something signals it again: with level-triggered INTx the
   * guest then takes an interrupt storm that no handler can clear (seen with
   * uio_pci_generic in a Linux guest). So the destination signals INTx once
   * when the device next runs, whatever the command register says (the
   * client gates the line by INTX_DISABLE itself), and auto-masks it: the
   * client's next acknowledgement (EOI, then UNMASK) lowers the line.
   */
  adoptHeldIntx(held: boolean): void {
    this.resignalIntx = held;
    if (held && this.running()) this.reevaluate();
  }

  private resignalHeldIntx(): void {
    this.resignalIntx = false;
    if (this.mode !== "intx") return;
    if (this.deviceSignal(IrqIndex.INTX, 0)) {
      this.masked[IrqIndex.INTX]![0] = true;
      this.intxHeld = true;
      this.log.debug("INTx signalled again: the source's client held it when the device stopped");
    }
  }

  /** A device-initiated interrupt: true when delivered; a failed write is counted and logged. */
  private deviceSignal(index: number, vector: number): boolean {
    if (this.fds[index]![vector]! < 0) return false;
    const errno = this.signal(index, vector);
    if (errno === 0) return true;
    const undelivered = ++this.undelivered[index]!;
    const fields = { index, vector, errno, undelivered };
    if (this.logLimited) this.logLimited("warn", fields, "interrupt not delivered");
    else this.log.warn(fields, "interrupt not delivered");
    return false;
  }

  /** An interrupt under injected faults: held (written later) or lost, as the fault says; else written now. */
  private signal(index: number, vector: number): number {
    if (this.hold !== null) {
      const ms = this.hold(index, vector);
      if (ms !== undefined) {
        // the eventfd is looked up when the time comes: the client may have replaced it meanwhile
        if (ms !== Infinity) setTimeout(() => this.write(index, vector), ms).unref();
        return 0;
      }
    }
    return this.write(index, vector);
  }

  /** One non-blocking eventfd write: 0, or the errno it failed with (-1 when no eventfd is registered). */
  private write(index: number, vector: number): number {
    const fd = this.fds[index]![vector]!;
    if (fd < 0) return -1;
    try {
      writeSync(fd, EVENTFD_ONE);
    } catch (err) {
      const e = (err as NodeJS.ErrnoException).errno;
      return typeof e === "number" && e !== 0 ? Math.abs(e) : Errno.EIO;
    }
    this.delivered[index]!++;
    return 0;
  }
}

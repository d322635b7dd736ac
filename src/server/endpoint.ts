/**
 * One emulated device and everything about it that outlives a client
 * connection: config space, BAR handlers, interrupts, the DMA engine, the
 * run state. Per-client resources (DMA regions and eventfds) are released
 * when the client goes, as the spec asks; the device state is kept.
 */
import type { Logger } from "pino";
import type { Device, DeviceContext, Doorbell } from "../device/api.ts";
import { IrqIndex, MigState, RegionIndex } from "../../protocol/constants.ts";
import { fail } from "../../protocol/errors.ts";
import { DmaEngine, type SocketDma } from "../dma/dma-engine.ts";
import { DmaTable } from "../dma/dma-table.ts";
import type { DirtyLog } from "../dma/dirty-bitmap.ts";
import { FaultSet } from "../faults/fault-set.ts";
import type { Fault } from "../faults/language.ts";
import { InterruptController, type LimitedLog } from "../irq/interrupts.ts";
import { MigrationController, type MigrationOptions } from "../migration/controller.ts";
import { migStateName } from "../migration/fsm.ts";
import { PciFunction } from "../pci/pci-function.ts";
import { IoEventFds } from "./ioeventfds.ts";

export interface EndpointOptions {
  log: Logger;
  maxDmaMaps: number;
  closeFd: (fd: number) => void;
  migration?: MigrationOptions;
  /** Faults to inject (specs of docs/faults.md, or parsed). */
  faults?: readonly (string | Fault)[];
}

export class Endpoint {
  readonly pci: PciFunction;
  readonly irq: InterruptController;
  readonly dma: DmaEngine;
  dmaTable: DmaTable;
  /** Non-null between DMA_LOGGING_START and STOP. */
  dirtyLog: DirtyLog | null = null;
  readonly migration: MigrationController;
  /** The client's ioeventfds for doorbells (GET_REGION_IO_FDS). */
  readonly ioEventFds: IoEventFds;
  readonly log: Logger;
  /** Faults injected on demand, or null (then no hook does anything). */
  readonly faults: FaultSet | null;
  private isRunning = true;

  constructor(
    readonly device: Device,
    opts: EndpointOptions,
  ) {
    this.log = opts.log;
    this.ioEventFds = new IoEventFds(opts.log);
    this.pci = new PciFunction(device);
    const caps = device.capabilities;
    const counts = [];
    counts[IrqIndex.INTX] = device.interruptPin ? 1 : 0;
    counts[IrqIndex.MSI] = caps?.msi?.vectors ?? 0;
    counts[IrqIndex.MSIX] = caps?.msix?.vectors ?? 0;
    counts[IrqIndex.ERR] = 0;
    counts[IrqIndex.REQ] = 0;
    this.irq = new InterruptController(counts, this.pci.config, Boolean(device.interruptPin), () => this.isRunning, opts.log, opts.closeFd, this.pci.msixTable);
    this.faults = FaultSet.of(opts.faults, opts.log, () => this.migration.state);
    if (this.faults?.hasIrqFaults) this.irq.hold = this.faults.irqHold;
    this.dmaTable = new DmaTable(opts.maxDmaMaps);
    this.dma = new DmaEngine(() => this.dmaTable, () => this.isRunning && this.pci.config.busMaster);
    const config = this.pci.config;
    const endpoint = this;
    const ctx: DeviceContext = {
      irq: this.irq,
      dma: this.dma,
      config: {
        read: (offset, length) => config.read(offset, length),
        get busMaster() {
          return config.busMaster;
        },
        get memoryEnabled() {
          return config.memoryEnabled;
        },
      },
      log: opts.log.child({ device: device.type }),
      get running() {
        return endpoint.isRunning;
      },
    };
    device.attach(ctx);
    this.migration = new MigrationController(this, opts.migration);
  }

  /** The VFIO migration state. */
  get migrationState(): MigState {
    return this.migration.state;
  }

  get running(): boolean {
    return this.isRunning;
  }

  /** Migration and reset stop and restart the device; it is told of each change. */
  setRunning(running: boolean): void {
    if (running === this.isRunning) return;
    this.isRunning = running;
    this.device.runStateChanged?.(running);
    if (running) this.irq.reevaluate();
  }

  /**
   * Before a running device stops for migration: the device's own quiesce
   * (in-flight requests completed or recorded in its state). A device that
   * throws fails the arc (ERROR).
   */
  async quiesce(): Promise<void> {
    if (!this.isRunning || !this.device.quiesce) return;
    const t0 = performance.now();
    await this.device.quiesce();
    this.log.debug({ ms: Math.round(performance.now() - t0) }, "device quiesced");
  }

  regionSize(index: number): bigint {
    return this.pci.regionSize(index);
  }

  /** The doorbells the device declares in region `index` (a BAR); none elsewhere. */
  doorbells(index: number): readonly Doorbell[] {
    if (index < RegionIndex.BAR0 || index > RegionIndex.BAR5) return [];
    return this.device.bars.find((b) => b.index === index)?.doorbells ?? [];
  }

  /** Checks that [offset, offset + count) lies in the region, in bigint so nothing wraps. */
  checkAccess(index: number, offset: bigint, count: number): number {
    const size = this.pci.regionSize(index);
    if (size === 0n) throw fail.inval(`region ${index} does not exist`);
    if (count === 0) throw fail.inval("access of 0 bytes");
    if (offset + BigInt(count) > size) {
      throw fail.inval(`access [0x${offset.toString(16)}, +${count}) beyond region ${index} of size 0x${size.toString(16)}`);
    }
    return Number(offset);
  }

  regionRead(index: number, offset: bigint, count: number): Buffer {
    return this.pci.read(index, this.checkAccess(index, offset, count), count);
  }

  regionWrite(index: number, offset: bigint, data: Buffer): void {
    const effects = this.pci.write(index, this.checkAccess(index, offset, data.length), data);
    if (effects?.commandChanged && index === RegionIndex.CONFIG) this.irq.reevaluate();
  }

  /** DEVICE_RESET: config space, MSI-X, interrupt masks and the device model to power-on. */
  reset(): void {
    this.pci.reset();
    this.irq.reset();
    this.device.reset();
    // spec (VFIO): DEVICE_RESET returns the migration state to RUNNING, ERROR included
    this.migration.reset();
    this.setRunning(true);
  }

  startDirtyLog(log: DirtyLog): void {
    this.dirtyLog = log;
    this.dma.dirty = log;
  }

  stopDirtyLog(): void {
    this.dirtyLog = null;
    this.dma.dirty = null;
  }

  /** A client connected: DMA over its socket, interrupt warnings through its rate-limited log. */
  attachClient(socket: SocketDma, logLimited?: LimitedLog): void {
    this.dma.socket = socket;
    this.irq.logLimited = logLimited ?? null;
  }

  /**
   * Client gone: its DMA regions, eventfds and DMA logging are released;
   * what happens to the device depends on where its migration stood (VFIO
   * returns a closed device to RUNNING, and the next client, like QEMU,
   * assumes RUNNING on attach):
   * - RUNNING: nothing more; the device state stays.
   * - RESUMING: the migration is aborted, and abort is reset (the kernel's
   *   rule): the partial stream is dropped and the device, config space
   *   included, goes back to power-on, so nothing half-loaded survives.
   * - ERROR: a DEVICE_RESET on the client's behalf; ERROR is not left to the
   *   next client.
   * - STOP after a completed migration (the stream read to its END, or a
   *   stream loaded): back to RUNNING, state kept. QEMU leaves a migrated
   *   source just so, with DMA logging still on: an ordinary end.
   * - STOP with no migration under way (RUNNING -> STOP: QEMU stops its
   *   devices when the guest powers off): back to RUNNING, state kept.
   * - any other state (PRE_COPY, STOP_COPY, a STOP that ended nothing, the
   *   P2P states): the migration dies with its client; back to RUNNING,
   *   device state kept.
   */
  detachClient(): void {
    this.dma.socket = null;
    this.irq.logLimited = null;
    const logging = this.dirtyLog !== null;
    this.stopDirtyLog();
    this.dmaTable.removeAll();
    this.irq.releaseAll();
    this.ioEventFds.releaseAll();
    const mig = this.migration.state;
    const state = migStateName(mig);
    if (mig === MigState.RUNNING) {
      if (logging) this.log.info("client left with DMA logging on; logging stopped");
    } else if (mig === MigState.RESUMING) {
      this.log.warn({ state }, "client left while RESUMING: partial stream dropped, device reset to power-on");
      this.reset();
    } else if (mig === MigState.ERROR) {
      this.log.warn({ state }, "client left with the device in ERROR: device reset to power-on");
      this.reset();
    } else if (mig === MigState.STOP && this.migration.completed !== null) {
      const what = this.migration.completed === "saved" ? "stream read to its end" : "stream loaded";
      this.log.info({ state, logging }, `client left after a completed migration (${what}); back to RUNNING`);
      this.migration.reset();
      this.setRunning(true);
    } else if (!this.migration.migrating) {
      // a stopped VM, no migration (QEMU stops its devices when the guest powers off)
      this.log.info({ state }, "client left with the device stopped; back to RUNNING");
      this.migration.reset();
      this.setRunning(true);
    } else {
      this.log.warn({ state }, "client left mid-migration; back to RUNNING, device state kept");
      this.migration.reset();
      this.setRunning(true);
    }
  }
}

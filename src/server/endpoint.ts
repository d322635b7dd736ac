/**
 * One emulated device and everything about it that outlives a client
 * connection: config space, BAR handlers, interrupts, the DMA engine, the
 * run state. Per-client resources (DMA regions and eventfds) are released
 * when the client goes, as the spec asks; the device state is kept.
 */
import type { Logger } from "pino";
import type { Device, DeviceContext } from "../device/api.ts";
import { IrqIndex, MigState, RegionIndex } from "../../protocol/constants.ts";
import { fail } from "../../protocol/errors.ts";
import { DmaEngine, type SocketDma } from "../dma/dma-engine.ts";
import { DmaTable } from "../dma/dma-table.ts";
import type { DirtyLog } from "../dma/dirty-bitmap.ts";
import { InterruptController, type LimitedLog } from "../irq/interrupts.ts";
import { MigrationController, type MigrationOptions } from "../migration/controller.ts";
import { PciFunction } from "../pci/pci-function.ts";

export interface EndpointOptions {
  log: Logger;
  maxDmaMaps: number;
  closeFd: (fd: number) => void;
  migration?: MigrationOptions;
}

export class Endpoint {
  readonly pci: PciFunction;
  readonly irq: InterruptController;
  readonly dma: DmaEngine;
  dmaTable: DmaTable;
  /** Non-null between DMA_LOGGING_START and STOP. */
  dirtyLog: DirtyLog | null = null;
  readonly migration: MigrationController;
  readonly log: Logger;
  private isRunning = true;

  constructor(
    readonly device: Device,
    opts: EndpointOptions,
  ) {
    this.log = opts.log;
    this.pci = new PciFunction(device);
    const caps = device.capabilities;
    const counts = [];
    counts[IrqIndex.INTX] = device.interruptPin ? 1 : 0;
    counts[IrqIndex.MSI] = caps?.msi?.vectors ?? 0;
    counts[IrqIndex.MSIX] = caps?.msix?.vectors ?? 0;
    counts[IrqIndex.ERR] = 0;
    counts[IrqIndex.REQ] = 0;
    this.irq = new InterruptController(counts, this.pci.config, Boolean(device.interruptPin), () => this.isRunning, opts.log, opts.closeFd, this.pci.msixTable);
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

  regionSize(index: number): bigint {
    return this.pci.regionSize(index);
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

  /** Client gone: its DMA regions and eventfds are released; the device state stays. */
  detachClient(): void {
    this.dma.socket = null;
    this.irq.logLimited = null;
    this.stopDirtyLog();
    this.dmaTable.removeAll();
    this.irq.releaseAll();
    // A migration dies with the client that drove it (VFIO returns a closed
    // device to RUNNING). Left alone, a client gone in STOP_COPY or RESUMING
    // left the device stopped for the next client, which (like QEMU) assumes
    // RUNNING on attach (robustness suite, lifecycle: "in the middle of
    // PRE_COPY/STOP_COPY/RESUMING"). The device's own state is kept: no
    // device reset, a half-written resume stream is dropped unapplied.
    // ERROR stays: that needs a DEVICE_RESET from the next client.
    const mig = this.migration.state;
    if (mig !== MigState.RUNNING && mig !== MigState.ERROR) {
      this.log.info({ state: mig }, "client left mid-migration; back to RUNNING");
      this.migration.reset();
      this.setRunning(true);
    }
  }
}

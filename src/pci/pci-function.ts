/**
 * A device as the client sees it: VFIO regions (BARs, ROM, config space,
 * VGA) routed to config space, the MSI-X table/PBA, or the device's own
 * handlers. Bounds are checked by the caller (the region handler), with
 * bigint arithmetic, before anything here runs.
 */
import type { BarDefinition, Device } from "../device/api.ts";
import { RegionIndex } from "../../protocol/constants.ts";
import { fail } from "../../protocol/errors.ts";
import { ConfigSpace, type ConfigWriteEffects } from "./config-space.ts";
import { MsixTable } from "./msix-table.ts";

const MSIX_ENTRY_SIZE = 16;
/**
 * Offsets reach the device's handlers as Numbers (RegionHandlers): a BAR
 * larger than this would lose the low bits of offsets above 2^53.
 */
export const MAX_BAR_SIZE = 1n << 53n;

interface MsixWindow {
  bar: number;
  start: number;
  end: number;
  read(offset: number, length: number): Buffer;
  write(offset: number, data: Uint8Array): void;
}

export class PciFunction {
  readonly config: ConfigSpace;
  readonly msixTable: MsixTable | null;
  private readonly bars: (BarDefinition | undefined)[] = [];
  private readonly msixWindows: MsixWindow[] = [];

  constructor(readonly device: Device) {
    for (const bar of device.bars) {
      if (bar.index < 0 || bar.index > 5) throw new Error(`BAR index ${bar.index} out of range`);
      if (this.bars[bar.index]) throw new Error(`BAR ${bar.index} defined twice`);
      if (bar.size > MAX_BAR_SIZE) {
        throw new Error(`BAR ${bar.index} of 0x${bar.size.toString(16)} bytes is larger than 2^53: offsets reach the handlers as Numbers and would lose bits`);
      }
      this.bars[bar.index] = bar;
    }
    this.config = new ConfigSpace({
      ...device.identity,
      bars: device.bars.map((b) => ({ index: b.index, size: b.size, kind: b.kind, prefetchable: b.prefetchable })),
      interruptPin: device.interruptPin ?? 0,
      capabilities: device.capabilities,
    });
    const msix = device.capabilities?.msix;
    if (msix) {
      const table = new MsixTable(msix.vectors);
      this.msixTable = table;
      const tableLen = msix.vectors * MSIX_ENTRY_SIZE;
      const pbaLen = Math.ceil(msix.vectors / 64) * 8;
      for (const [bar, start, len] of [
        [msix.tableBar, msix.tableOffset, tableLen],
        [msix.pbaBar, msix.pbaOffset, pbaLen],
      ] as const) {
        const def = this.bars[bar];
        if (!def || BigInt(start + len) > def.size) {
          throw new Error(`MSI-X structure at BAR ${bar} offset 0x${start.toString(16)} does not fit the BAR`);
        }
      }
      this.msixWindows.push(
        { bar: msix.tableBar, start: msix.tableOffset, end: msix.tableOffset + tableLen, read: (o, l) => table.readTable(o, l), write: (o, d) => void table.writeTable(o, d) },
        { bar: msix.pbaBar, start: msix.pbaOffset, end: msix.pbaOffset + pbaLen, read: (o, l) => table.readPba(o, l), write: () => {} },
      );
    } else {
      this.msixTable = null;
    }
  }

  /** Size of a VFIO region; 0 for regions the device does not have. */
  regionSize(index: number): bigint {
    if (index === RegionIndex.CONFIG) return BigInt(this.config.size);
    if (index >= RegionIndex.BAR0 && index <= RegionIndex.BAR5) return this.bars[index]?.size ?? 0n;
    return 0n;
  }

  read(index: number, offset: number, length: number): Buffer {
    if (index === RegionIndex.CONFIG) return this.config.read(offset, length);
    const bar = this.bar(index);
    const data = Buffer.alloc(length);
    const w = this.msixWindow(index, offset, length);
    if (w) return w.read(offset - w.start, length);
    bar.read(offset, data);
    return data;
  }

  /** Returns config-space effects for config writes, null for BAR writes. */
  write(index: number, offset: number, data: Buffer): ConfigWriteEffects | null {
    if (index === RegionIndex.CONFIG) return this.config.write(offset, data);
    const bar = this.bar(index);
    const w = this.msixWindow(index, offset, data.length);
    if (w) w.write(offset - w.start, data);
    else bar.write(offset, data);
    return null;
  }

  reset(): void {
    this.config.reset();
    this.msixTable?.reset();
  }

  private bar(index: number): BarDefinition {
    const bar = index >= RegionIndex.BAR0 && index <= RegionIndex.BAR5 ? this.bars[index] : undefined;
    if (!bar) throw fail.inval(`region ${index} cannot be accessed`);
    return bar;
  }

  /** An access entirely inside the MSI-X table or PBA goes there; one straddling the edge is refused. */
  private msixWindow(index: number, offset: number, length: number): MsixWindow | null {
    for (const w of this.msixWindows) {
      if (w.bar !== index) continue;
      const end = offset + length;
      if (offset >= w.start && end <= w.end) return w;
      if (offset < w.end && w.start < end) throw fail.inval("access straddles the MSI-X table or PBA edge");
    }
    return null;
  }
}

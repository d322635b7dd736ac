/**
 * Device-initiated DMA: the `Dma` the device sees. Routes each access to the
 * client's memory through the mmap'd fd when the client shared one, and
 * through DMA_READ / DMA_WRITE messages when it did not. Every successful
 * write is reported to the dirty log (migration) whichever path it took.
 */
import type { Dma } from "../device/api.ts";
import { fail } from "../../protocol/errors.ts";
import type { DmaTable } from "./dma-table.ts";

/** DMA over the socket, provided by the connection. */
export interface SocketDma {
  dmaRead(address: bigint, length: number): Promise<Buffer>;
  dmaWrite(address: bigint, data: Uint8Array): Promise<void>;
}

/** Where device writes are recorded while dirty logging is on. */
export interface DirtySink {
  markDirty(address: bigint, length: bigint): void;
}

export class DmaEngine implements Dma {
  /** Null while no client is connected. */
  socket: SocketDma | null = null;
  /** Non-null while DMA logging is started. */
  dirty: DirtySink | null = null;

  constructor(
    private readonly table: () => DmaTable,
    /** Bus master enabled and the device allowed to run. */
    private readonly mayAccess: () => boolean,
  ) {}

  async read(address: bigint, length: number): Promise<Buffer> {
    this.gate();
    const region = this.table().lookup(address, BigInt(length));
    if (!region.readable) throw fail.perm(`DMA region at 0x${region.iova.toString(16)} is not readable`);
    if (region.memory) return region.memory.read(address - region.iova, length);
    return this.viaSocket().dmaRead(address, length);
  }

  async write(address: bigint, data: Uint8Array): Promise<void> {
    this.gate();
    const region = this.table().lookup(address, BigInt(data.length));
    if (!region.writable) throw fail.perm(`DMA region at 0x${region.iova.toString(16)} is not writable`);
    if (region.memory) region.memory.write(address - region.iova, data);
    else await this.viaSocket().dmaWrite(address, data);
    this.dirty?.markDirty(address, BigInt(data.length));
  }

  private gate(): void {
    if (!this.mayAccess()) throw fail.perm("DMA refused: bus master off or device not running");
  }

  private viaSocket(): SocketDma {
    if (!this.socket) throw fail.fault("DMA refused: no client connected");
    return this.socket;
  }
}

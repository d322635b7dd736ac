/**
 * Device-initiated DMA: the `Dma` the device sees. Routes each access to the
 * client's memory through the mmap'd fd when the client shared one, and
 * through DMA_READ / DMA_WRITE messages when it did not. Every successful
 * write is reported to the dirty log (migration) whichever path it took.
 *
 * An access is planned before anything moves: each range is cut into pieces
 * at the edges of the client's DMA regions (QEMU maps guest RAM as one
 * region per memory section, so a buffer can straddle two), every piece is
 * checked (mapped, readable or writable), and only then are bytes copied,
 * piece by piece, each through its own region's path and logged dirty on its
 * own. So an address that is not mapped at all fails the whole access with
 * EFAULT before a byte is written, and a range over adjacent regions works
 * whether they are fd-backed, fd-less or mixed.
 */
import type { Dma, DmaSegment, DmaViews } from "../device/api.ts";
import { fail } from "../../protocol/errors.ts";
import { U64_MAX } from "../../protocol/u64.ts";
import type { DmaRegion, DmaTable } from "./dma-table.ts";
import { GuestWindow } from "./guest-window.ts";

/** DMA over the socket, provided by the connection. */
export interface SocketDma {
  dmaRead(address: bigint, length: number): Promise<Buffer>;
  dmaWrite(address: bigint, data: Uint8Array): Promise<void>;
}

/** Where device writes are recorded while dirty logging is on. */
export interface DirtySink {
  markDirty(address: bigint, length: bigint): void;
}

/** A part of an access that lies in one DMA region. */
interface Piece {
  readonly region: DmaRegion;
  readonly address: bigint;
  readonly length: number;
}

const EMPTY = Buffer.alloc(0);

function hex(n: bigint): string {
  return `0x${n.toString(16)}`;
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
    const pieces = this.plan([{ address, length }], "read");
    if (pieces.length === 1) {
      const p = pieces[0]!;
      const mem = p.region.memory;
      if (mem) return mem.read(p.address - p.region.iova, p.length);
      return this.viaSocket().dmaRead(p.address, p.length);
    }
    return this.gather(pieces, length);
  }

  async write(address: bigint, data: Uint8Array): Promise<void> {
    this.gate();
    await this.scatter(this.plan([{ address, length: data.length }], "write"), data);
  }

  async readv(segments: readonly DmaSegment[]): Promise<Buffer> {
    this.gate();
    const pieces = this.plan(segments, "read");
    return this.gather(pieces, total(pieces));
  }

  async writev(segments: readonly DmaSegment[], data: Uint8Array): Promise<void> {
    this.gate();
    const pieces = this.plan(segments, "write");
    const n = total(pieces);
    if (n !== data.length) throw fail.inval(`writev of ${data.length} bytes over segments of ${n}`);
    await this.scatter(pieces, data);
  }

  map(segments: readonly DmaSegment[], access: "read" | "write"): DmaViews | null {
    this.gate();
    const pieces = this.plan(segments, access);
    const windows: GuestWindow[] = [];
    for (const p of pieces) {
      const mem = p.region.memory;
      if (!(mem instanceof GuestWindow)) return null;
      windows.push(mem);
    }
    const buffers: Buffer[] = [];
    let length = 0;
    for (let i = 0; i < pieces.length; i++) {
      const p = pieces[i]!;
      const w = windows[i]!;
      // a view may not cross one of the server's mapping windows: cut there too
      const ws = w.windowSize;
      let at = Number(p.address - p.region.iova);
      let left = p.length;
      while (left > 0) {
        const n = Math.min(left, ws - (at % ws));
        buffers.push(w.view(BigInt(at), n));
        at += n;
        left -= n;
      }
      length += p.length;
    }
    for (const w of windows) w.pin();
    if (access === "write") this.logDirty(pieces);
    let released = false;
    return {
      buffers,
      length,
      release: () => {
        if (released) return;
        released = true;
        if (access === "write") this.logDirty(pieces);
        for (const w of windows) w.unpin();
      },
    };
  }

  private gate(): void {
    if (!this.mayAccess()) throw fail.perm("DMA refused: bus master off or device not running");
  }

  /**
   * The access cut at region edges and checked, before any byte moves:
   * EFAULT for the first byte that is not mapped (or whose region is being
   * unmapped), EPERM for a region that forbids the access.
   */
  private plan(segments: readonly DmaSegment[], access: "read" | "write"): Piece[] {
    const table = this.table();
    const pieces: Piece[] = [];
    // a scatter-gather list mostly stays in one region: look it up again only on leaving it
    let region: DmaRegion | null = null;
    let regionEnd = 0n;
    for (let i = 0; i < segments.length; i++) {
      const { address, length } = segments[i]!;
      if (!Number.isSafeInteger(length) || length < 0) throw fail.inval(`DMA length ${length} is not a byte count`);
      if (typeof address !== "bigint" || address < 0n || address + BigInt(length) - 1n > U64_MAX) {
        throw fail.inval(`DMA range [${String(address)}, +${length}) is not inside the 64-bit address space`);
      }
      let at = address;
      let left = length;
      while (left > 0) {
        if (region === null || at < region.iova || at >= regionEnd) {
          region = this.regionAt(table, at, address, length, access);
          regionEnd = region.iova + region.size;
        }
        const room = regionEnd - at;
        const n = room < BigInt(left) ? Number(room) : left;
        pieces.push({ region, address: at, length: n });
        left -= n;
        if (left > 0) at += BigInt(n);
      }
    }
    return pieces;
  }

  /** The region holding `at`, checked for the access (EFAULT, EPERM). */
  private regionAt(table: DmaTable, at: bigint, address: bigint, length: number, access: "read" | "write"): DmaRegion {
    let region: DmaRegion;
    try {
      region = table.lookup(at, 1n);
    } catch {
      throw fail.fault(`DMA range [${hex(address)}, +0x${length.toString(16)}) is not mapped at ${hex(at)}`);
    }
    const mem = region.memory;
    if (mem instanceof GuestWindow && mem.closing) {
      throw fail.fault(`DMA range [${hex(address)}, +0x${length.toString(16)}) is being unmapped at ${hex(at)}`);
    }
    if (access === "read" ? !region.readable : !region.writable) {
      throw fail.perm(`DMA region at ${hex(region.iova)} is not ${access === "read" ? "readable" : "writable"}`);
    }
    return region;
  }

  private async gather(pieces: readonly Piece[], length: number): Promise<Buffer> {
    if (length === 0) return EMPTY;
    const out = Buffer.allocUnsafe(length);
    let done = 0;
    for (const p of pieces) {
      const mem = p.region.memory;
      const bytes = mem ? mem.read(p.address - p.region.iova, p.length) : await this.viaSocket().dmaRead(p.address, p.length);
      out.set(bytes, done);
      done += p.length;
    }
    return out;
  }

  private async scatter(pieces: readonly Piece[], data: Uint8Array): Promise<void> {
    let done = 0;
    for (const p of pieces) {
      const part = pieces.length === 1 ? data : data.subarray(done, done + p.length);
      const mem = p.region.memory;
      if (mem) mem.write(p.address - p.region.iova, part);
      else await this.viaSocket().dmaWrite(p.address, part);
      // logged per region, as each part lands
      this.dirty?.markDirty(p.address, BigInt(p.length));
      done += p.length;
    }
  }

  private logDirty(pieces: readonly Piece[]): void {
    const d = this.dirty;
    if (!d) return;
    for (const p of pieces) d.markDirty(p.address, BigInt(p.length));
  }

  private viaSocket(): SocketDma {
    if (!this.socket) throw fail.fault("DMA refused: no client connected");
    return this.socket;
  }
}

function total(pieces: readonly Piece[]): number {
  let n = 0;
  for (const p of pieces) n += p.length;
  return n;
}

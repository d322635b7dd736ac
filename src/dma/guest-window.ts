/**
 * Guest memory the client shared with an fd, as the DMA table holds it: the
 * mapping (src/transport/mapping.ts) plus a count of zero-copy views a
 * device still holds (`Dma.map`).
 *
 * Why the count: a view may be handed to the kernel (a file read into guest
 * memory runs on a libuv thread), and unmapping memory a thread is writing
 * is a SIGSEGV. So while views are held, `unmap()` only marks the window
 * closing and the munmap happens at the last release; and DMA_UNMAP waits for
 * `idle()` before it replies (spec: "the server must release all references
 * to that DMA region before replying, which potentially includes in-flight
 * DMA transactions"). A closing window takes no new access.
 */
import type { MappedMemory } from "../transport/mapping.ts";
import type { MemoryWindow } from "./dma-table.ts";

export class GuestWindow implements MemoryWindow {
  private pins = 0;
  private closingFlag = false;
  private unmapPending = false;
  private waiters: (() => void)[] = [];

  constructor(private readonly mem: MappedMemory) {}

  /** Bytes per mapping window: no view crosses a multiple of this. */
  get windowSize(): number {
    return this.mem.windowSize;
  }

  get writable(): boolean {
    return this.mem.writable;
  }

  /** True once unmap() or close() was called: no new access is allowed. */
  get closing(): boolean {
    return this.closingFlag;
  }

  /** Views currently held. */
  get pinned(): number {
    return this.pins;
  }

  read(offset: bigint, length: number): Buffer {
    return this.mem.read(offset, length);
  }

  write(offset: bigint, data: Uint8Array): void {
    this.mem.write(offset, data);
  }

  /** A zero-copy view inside one mapping window (RangeError across a window edge). */
  view(offset: bigint, length: number): Buffer {
    return this.mem.view(offset, length);
  }

  pin(): void {
    this.pins++;
  }

  unpin(): void {
    if (this.pins <= 0) throw new Error("GuestWindow: unpin without pin");
    if (--this.pins > 0) return;
    const waiters = this.waiters;
    this.waiters = [];
    if (this.unmapPending) {
      this.unmapPending = false;
      this.mem.unmap();
    }
    for (const w of waiters) w();
  }

  /** Refuse new access from now on (DMA_UNMAP in progress); the mapping stays until unmap(). */
  close(): void {
    this.closingFlag = true;
  }

  /** Resolves once no view is held. */
  idle(): Promise<void> {
    if (this.pins === 0) return Promise.resolve();
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  /** munmap now, or at the last release of a view. */
  unmap(): void {
    this.closingFlag = true;
    if (this.pins > 0) this.unmapPending = true;
    else this.mem.unmap();
  }
}

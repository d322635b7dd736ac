/**
 * The pages a migration source still has to send, in order: a queue of
 * page-number segments. A device's `takeDirtyPages` may hand over a
 * Uint32Array, which is queued as it is (no per-page copy), so queueing
 * every page of a 256 MiB device (65,536 pages) costs one array, not 65,536
 * pushes; other iterables are collected once into a segment.
 */
export class PageQueue {
  #segments: Uint32Array[] = [];
  /** Read position in the first segment. */
  #at = 0;
  #length = 0;

  /** Pages still queued. */
  get length(): number {
    return this.#length;
  }

  /** Appends `pages` after what is queued. A Uint32Array is kept, not copied: the caller must not change it afterwards. */
  push(pages: Iterable<number>): void {
    const seg = pages instanceof Uint32Array ? pages : Uint32Array.from(pages);
    if (seg.length === 0) return;
    this.#segments.push(seg);
    this.#length += seg.length;
  }

  /**
   * Takes the next run of consecutive pages, at most `max` (≥ 1) of them;
   * null when the queue is empty. A run does not span segments.
   */
  take(max: number): { first: number; n: number } | null {
    const seg = this.#segments[0];
    if (seg === undefined) return null;
    const at = this.#at;
    const first = seg[at]!;
    const limit = Math.min(Math.max(1, max), seg.length - at);
    let n = 1;
    while (n < limit && seg[at + n] === first + n) n++;
    this.#at += n;
    this.#length -= n;
    if (this.#at === seg.length) {
      this.#segments.shift();
      this.#at = 0;
    }
    return { first, n };
  }

  clear(): void {
    this.#segments = [];
    this.#at = 0;
    this.#length = 0;
  }
}

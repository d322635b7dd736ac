import { describe, expect, it } from "vitest";
import { PageQueue } from "../../../src/migration/page-queue.ts";

function drain(q: PageQueue, max: number): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  for (let r = q.take(max); r; r = q.take(max)) out.push([r.first, r.n]);
  return out;
}

describe("PageQueue", () => {
  it("hands out runs of consecutive pages, at most max each, in queue order", () => {
    const q = new PageQueue();
    q.push(Uint32Array.of(0, 1, 2, 3, 7, 8, 20));
    q.push([21, 22, 5]);
    expect(q.length).toBe(10);
    // runs do not span segments: 20 and 21 come out apart
    expect(drain(q, 3)).toEqual([[0, 3], [3, 1], [7, 2], [20, 1], [21, 2], [5, 1]]);
    expect(q.length).toBe(0);
    expect(q.take(3)).toBeNull();
  });

  it("keeps a Uint32Array as it is, and counts what is left after partial takes", () => {
    const q = new PageQueue();
    const pages = Uint32Array.from({ length: 65_536 }, (_, i) => i);
    q.push(pages);
    expect(q.take(256)).toEqual({ first: 0, n: 256 });
    expect(q.length).toBe(65_536 - 256);
    q.push(new Uint32Array(0)); // nothing queued
    expect(q.length).toBe(65_536 - 256);
    expect(drain(q, 1 << 20)).toEqual([[256, 65_280]]);
  });

  it("clear() empties it; max below 1 still takes one page", () => {
    const q = new PageQueue();
    q.push([4, 5]);
    expect(q.take(0)).toEqual({ first: 4, n: 1 });
    q.clear();
    expect(q.length).toBe(0);
    expect(q.take(1)).toBeNull();
  });
});

/**
 * The DMA map table as a balanced tree (issue 9, part 2, item 13): the same
 * answers as a plain sorted list for every operation, under a seeded random
 * mix of maps, unmaps and lookups, and the iteration the DMA engine uses to
 * walk adjacent regions (`regionsFrom`, `find`). Its cost (O(log n) per
 * map, a full 65,535-map table in seconds) is in the bench:
 * test/bench/dma-maps.ts, row "DMA_MAP ×65,535".
 */
import { describe, expect, it } from "vitest";
import { Errno } from "../../../protocol/constants.ts";
import { VfioUserError } from "../../../protocol/errors.ts";
import { DmaTable, type DmaRegion } from "../../../src/dma/dma-table.ts";

const region = (iova: bigint, size: bigint): DmaRegion => ({ iova, size, offset: 0n, readable: true, writable: true, memory: null });

function errnoOf(fn: () => unknown): number {
  try {
    fn();
  } catch (err) {
    return (err as VfioUserError).errno;
  }
  return 0;
}

/** The reference: a sorted array searched linearly. */
class Model {
  readonly list: DmaRegion[] = [];
  constructor(private readonly max: number) {}
  add(r: DmaRegion): number {
    if (this.list.length >= this.max) return Errno.ENOSPC;
    if (this.list.some((x) => r.iova < x.iova + x.size && x.iova < r.iova + r.size)) return Errno.EEXIST;
    this.list.push(r);
    this.list.sort((a, b) => (a.iova < b.iova ? -1 : 1));
    return 0;
  }
  remove(iova: bigint, size: bigint): number {
    const i = this.list.findIndex((x) => x.iova === iova && x.size === size);
    if (i < 0) return Errno.ENOENT;
    this.list.splice(i, 1);
    return 0;
  }
  find(a: bigint): DmaRegion | undefined {
    return this.list.find((x) => x.iova <= a && a < x.iova + x.size);
  }
  lookup(a: bigint, len: bigint): DmaRegion | undefined {
    const r = this.list.filter((x) => x.iova <= a).pop();
    return r && a + len <= r.iova + r.size ? r : undefined;
  }
  from(a: bigint): bigint[] {
    return this.list.filter((x) => x.iova + x.size > a).map((x) => x.iova);
  }
}

/** xorshift32, seeded. */
function rng(seed: number): (n: number) => number {
  let x = seed >>> 0 || 1;
  return (n) => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x % n;
  };
}

describe("DmaTable (AVL) agrees with a sorted list", () => {
  for (const seed of [1, 7, 20261203]) {
    it(`20,000 random maps, unmaps and lookups over a small address space (seed ${seed})`, () => {
      const r = rng(seed);
      const t = new DmaTable(300);
      const m = new Model(300);
      const page = 0x1000n;
      for (let step = 0; step < 20_000; step++) {
        const iova = BigInt(r(1024)) * page;
        const size = BigInt(1 + r(4)) * page;
        switch (r(5)) {
          case 0:
          case 1:
            expect(errnoOf(() => t.add(region(iova, size)))).toBe(m.add(region(iova, size)));
            break;
          case 2: {
            // unmap an existing region most of the time, a wrong size sometimes
            const known = m.list.length > 0 && r(4) !== 0 ? m.list[r(m.list.length)]! : region(iova, size);
            const sz = r(8) === 0 ? known.size + page : known.size;
            expect(errnoOf(() => t.remove(known.iova, sz))).toBe(m.remove(known.iova, sz));
            break;
          }
          case 3: {
            const a = iova + BigInt(r(0x1000));
            expect(t.find(a)?.iova).toBe(m.find(a)?.iova);
            const len = BigInt(r(0x3000));
            const want = m.lookup(a, len);
            if (want) expect(t.lookup(a, len).iova).toBe(want.iova);
            else expect(errnoOf(() => t.lookup(a, len))).toBe(Errno.EFAULT);
            break;
          }
          case 4:
            expect([...t.regionsFrom(iova)].map((x) => x.iova)).toEqual(m.from(iova));
            break;
        }
        expect(t.count).toBe(m.list.length);
      }
      expect(t.regions().map((x) => x.iova)).toEqual(m.list.map((x) => x.iova));
    });
  }

  it("65,535 maps in a table of 65,535: all in order, the next is ENOSPC, every one found; unmapping them all empties it", () => {
    const t = new DmaTable(65_535);
    // insert in a scattered order so the tree has to rebalance all the way
    for (let i = 0; i < 65_535; i++) {
      const k = (i * 40_507) % 65_535;
      t.add(region(BigInt(k) * 0x2000n, 0x1000n));
    }
    expect(t.count).toBe(65_535);
    expect(errnoOf(() => t.add(region(1n << 40n, 0x1000n)))).toBe(Errno.ENOSPC);
    const all = t.regions();
    for (let i = 0; i < all.length; i++) expect(all[i]!.iova).toBe(BigInt(i) * 0x2000n);
    for (let i = 0; i < 65_535; i += 97) expect(t.lookup(BigInt(i) * 0x2000n + 0xfffn, 1n).iova).toBe(BigInt(i) * 0x2000n);
    expect(errnoOf(() => t.lookup(0x1000n, 1n))).toBe(Errno.EFAULT); // the gap after region 0
    for (let i = 0; i < 65_535; i++) t.remove(BigInt((i * 7) % 65_535) * 0x2000n, 0x1000n);
    expect(t.count).toBe(0);
    expect(t.regions()).toEqual([]);
  });

  it("regionsFrom walks adjacent regions in address order from the one holding the address", () => {
    const t = new DmaTable(10);
    t.add(region(0x3000n, 0x1000n));
    t.add(region(0x1000n, 0x1000n));
    t.add(region(0x2000n, 0x1000n));
    t.add(region(0x8000n, 0x1000n));
    expect([...t.regionsFrom(0x2800n)].map((r) => r.iova)).toEqual([0x2000n, 0x3000n, 0x8000n]);
    expect([...t.regionsFrom(0x4000n)].map((r) => r.iova)).toEqual([0x8000n]);
    expect([...t.regionsFrom(0x9000n)]).toEqual([]);
    expect(t.find(0x1fffn)?.iova).toBe(0x1000n);
    expect(t.find(0x4000n)).toBeUndefined();
  });

  it("regions() is rebuilt after every change", () => {
    const t = new DmaTable(10);
    t.add(region(0x1000n, 0x1000n));
    const a = t.regions();
    expect(t.regions()).toBe(a);
    t.add(region(0x3000n, 0x1000n));
    expect(t.regions().map((r) => r.iova)).toEqual([0x1000n, 0x3000n]);
    t.remove(0x1000n, 0x1000n);
    expect(t.regions().map((r) => r.iova)).toEqual([0x3000n]);
    expect(a.map((r) => r.iova)).toEqual([0x1000n]); // a snapshot handed out earlier is not changed under its holder
  });
});

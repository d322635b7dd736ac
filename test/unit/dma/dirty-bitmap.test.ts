import { describe, expect, it } from "vitest";
import { Errno } from "../../../protocol/constants.ts";
import { VfioUserError } from "../../../protocol/errors.ts";
import { DirtyBitmap, DirtyLog, type IovaRange } from "../../../src/dma/dirty-bitmap.ts";

const KiB = 1024n;
const TOP = 1n << 64n;

/** mulberry32: small seeded PRNG so failures replay. */
function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function randBig(r: () => number, n: bigint): bigint {
  // n below 2^53 in these tests
  return BigInt(Math.floor(r() * Number(n)));
}

/**
 * The model: a set of dirty tracking-page numbers (absolute: address / T).
 * Written from the vfio.h text, not from the implementation.
 */
class Model {
  readonly dirty = new Set<bigint>();
  constructor(
    readonly ranges: readonly IovaRange[],
    readonly pageSize: bigint,
  ) {}

  markDirty(addr: bigint, len: bigint): void {
    for (const { iova, length } of this.ranges) {
      const start = addr > iova ? addr : iova;
      const stop = addr + len < iova + length ? addr + len : iova + length;
      if (len <= 0n || start >= stop) continue;
      for (let p = start / this.pageSize; p <= (stop - 1n) / this.pageSize; p++) this.dirty.add(p);
    }
  }

  /** Expected report bytes: u64 words written little-endian, bit i of word w = page w*64+i. */
  report(iova: bigint, length: bigint, pageSize: bigint): Uint8Array {
    const bits = Number(length / pageSize);
    const words = new Array<bigint>(Math.ceil(bits / 64)).fill(0n);
    const T = this.pageSize;
    for (let b = 0; b < bits; b++) {
      const a = iova + BigInt(b) * pageSize;
      let any = false;
      for (let p = a / T; p <= (a + pageSize - 1n) / T; p++) if (this.dirty.has(p)) any = true;
      if (any) words[b >> 6]! |= 1n << BigInt(b & 63);
    }
    // Clear the tracking pages wholly inside the reported range.
    for (const p of [...this.dirty]) {
      if (p * T >= iova && (p + 1n) * T <= iova + length) this.dirty.delete(p);
    }
    const out = new Uint8Array(words.length * 8);
    const view = new DataView(out.buffer);
    words.forEach((w, i) => view.setBigUint64(i * 8, w, true));
    return out;
  }
}

function hexdump(bytes: Uint8Array): string {
  return Buffer.from(bytes).toString("hex");
}

function expectEinval(fn: () => unknown, pattern?: RegExp): void {
  let err: unknown;
  try {
    fn();
  } catch (e) {
    err = e;
  }
  expect(err).toBeInstanceOf(VfioUserError);
  expect((err as VfioUserError).errno).toBe(Errno.EINVAL);
  if (pattern) expect((err as Error).message).toMatch(pattern);
}

/** Random aligned report window inside [base, base+len) for page size R, or null. */
function randomWindow(r: () => number, base: bigint, len: bigint, R: bigint): { iova: bigint; length: bigint } | null {
  const first = ((base + R - 1n) / R) * R;
  const slots = (base + len - first) / R; // whole R pages that fit
  if (slots <= 0n) return null;
  const startSlot = randBig(r, slots);
  const count = 1n + randBig(r, slots - startSlot);
  return { iova: first + startSlot * R, length: count * R };
}

describe("DirtyBitmap against a set-of-pages model", () => {
  const configs: Array<{ base: bigint; pages: bigint; T: bigint }> = [
    { base: 0x7ff000n, pages: 1000n, T: 4n * KiB },
    { base: 0n, pages: 37n, T: 4n * KiB },
    { base: 0x10000n * 3n, pages: 65n, T: 64n * KiB },
    { base: 0x200n * 7n, pages: 777n, T: 512n },
    { base: 0x1000n, pages: 64n * 5n, T: 4n * KiB },
    { base: TOP - 4n * KiB * 131n, pages: 131n, T: 4n * KiB },
  ];
  const seeds = [1, 2, 3, 42, 1234];

  for (const { base, pages, T } of configs) {
    for (const seed of seeds) {
      it(`base=0x${base.toString(16)} pages=${pages} T=${T} seed=${seed}`, () => {
        const r = rng(seed);
        const len = pages * T;
        const bm = new DirtyBitmap(base, len, T);
        const model = new Model([{ iova: base, length: len }], T);
        const ratios = [1n, 2n, 8n, 64n, 128n, 1024n];
        const seen = { same: 0, coarser: 0, finer: 0, dirtyBits: 0 };
        for (let op = 0; op < 300; op++) {
          const kind = r();
          if (kind < 0.6) {
            // Writes anywhere around the range, including outside and straddling it.
            const addr = base - 3n * T + randBig(r, len + 6n * T);
            const l = r() < 0.5 ? 1n + randBig(r, 16n) : 1n + randBig(r, 5n * T);
            const a = addr < 0n ? 0n : addr;
            bm.markDirty(a, l);
            model.markDirty(a, l);
          } else if (kind < 0.95) {
            const ratio = ratios[Math.floor(r() * ratios.length)]!;
            const R = r() < 0.5 ? T * ratio : T / ratio > 0n ? T / ratio : 1n;
            const w = randomWindow(r, base, len, R);
            if (w === null) continue;
            const got = bm.report(w.iova, w.length, R);
            const want = model.report(w.iova, w.length, R);
            seen[R === T ? "same" : R > T ? "coarser" : "finer"]++;
            seen.dirtyBits += want.reduce((n, b) => n + (b !== 0 ? 1 : 0), 0);
            expect(hexdump(got), `op ${op}: report 0x${w.iova.toString(16)}+0x${w.length.toString(16)} @${R}`).toBe(
              hexdump(want),
            );
          } else {
            bm.clear();
            model.dirty.clear();
          }
          expect(bm.countDirty()).toBe(model.dirty.size);
        }
        // Every scaling direction was exercised, with something dirty to see.
        expect(seen.same).toBeGreaterThan(0);
        expect(seen.coarser).toBeGreaterThan(0);
        expect(seen.finer).toBeGreaterThan(0);
        expect(seen.dirtyBits).toBeGreaterThan(0);
        // Drain: a full report at the tracking size returns exactly the model.
        const got = bm.report(base, len, T);
        expect(hexdump(got)).toBe(hexdump(model.report(base, len, T)));
        expect(bm.countDirty()).toBe(0);
      });
    }
  }
});

describe("DirtyBitmap details", () => {
  it("marks partial pages and ignores writes outside the range", () => {
    const bm = new DirtyBitmap(0x10000n, 0x10000n, 0x1000n);
    bm.markDirty(0x10fffn, 2n); // last byte of page 0 and first of page 1
    bm.markDirty(0x0n, 0x10000n); // ends exactly at the range start
    bm.markDirty(0x20000n, 0x1000n); // starts exactly at the range end
    bm.markDirty(0x1f000n, 0n); // empty write
    expect(bm.countDirty()).toBe(2);
    expect(bm.isDirty(0x10000n)).toBe(true);
    expect(bm.isDirty(0x11000n)).toBe(true);
    expect(bm.isDirty(0x12000n)).toBe(false);
    expect(bm.isDirty(0x0n)).toBe(false);
  });

  it("reports whole u64 words, little-endian, bit i of word w = page w*64+i", () => {
    const bm = new DirtyBitmap(0n, 130n * 4096n, 4096n);
    for (const p of [0n, 9n, 63n, 64n, 129n]) bm.markDirty(p * 4096n, 1n);
    const out = bm.report(0n, 130n * 4096n, 4096n);
    expect(out.length).toBe(24); // ceil(130/64) words
    const view = new DataView(out.buffer);
    expect(view.getBigUint64(0, true)).toBe((1n << 0n) | (1n << 9n) | (1n << 63n));
    expect(view.getBigUint64(8, true)).toBe(1n << 0n);
    expect(view.getBigUint64(16, true)).toBe(1n << 1n);
    expect(bm.countDirty()).toBe(0);
  });

  it("a larger report page is dirty when any tracking page under it is", () => {
    const bm = new DirtyBitmap(0n, 64n * 4096n, 4096n);
    bm.markDirty(5n * 4096n, 1n); // in the first 32 KiB
    bm.markDirty(40n * 4096n, 1n); // in the sixth 32 KiB
    const out = bm.report(0n, 64n * 4096n, 32n * KiB);
    expect([...out]).toEqual([0b0010_0001, 0, 0, 0, 0, 0, 0, 0]);
    expect(bm.countDirty()).toBe(0);
  });

  it("a smaller report page replicates the tracking bit", () => {
    const bm = new DirtyBitmap(0n, 4n * 64n * KiB, 64n * KiB);
    bm.markDirty(64n * KiB + 5n, 1n); // tracking page 1
    const out = bm.report(0n, 4n * 64n * KiB, 4n * KiB); // 64 bits, 16 per tracking page
    const view = new DataView(out.buffer);
    expect(view.getBigUint64(0, true)).toBe(0xffffn << 16n);
  });

  it("a report covering part of a larger tracking page keeps that page dirty", () => {
    const bm = new DirtyBitmap(0n, 2n * 64n * KiB, 64n * KiB);
    bm.markDirty(0n, 1n);
    bm.markDirty(64n * KiB, 1n);
    // Report the second half of page 0 and the whole of page 1.
    const out = bm.report(32n * KiB, 96n * KiB, 4n * KiB);
    const view = new DataView(out.buffer);
    expect(view.getBigUint64(0, true)).toBe((1n << 24n) - 1n); // 8 + 16 bits
    expect(bm.isDirty(0n)).toBe(true); // partly reported: kept
    expect(bm.isDirty(64n * KiB)).toBe(false); // wholly reported: cleared
    // The first half is still reported dirty next time.
    const again = bm.report(0n, 32n * KiB, 4n * KiB);
    expect(new DataView(again.buffer).getBigUint64(0, true)).toBe(0xffn);
    expect(bm.isDirty(0n)).toBe(true); // still only partly covered
    expect(bm.report(0n, 64n * KiB, 64n * KiB)[0]).toBe(1);
    expect(bm.countDirty()).toBe(0);
  });

  it("an unaligned start at the tracking size shifts bits across bytes", () => {
    const bm = new DirtyBitmap(0n, 200n * 4096n, 4096n);
    const dirty = [3n, 10n, 11n, 70n, 150n, 199n];
    for (const p of dirty) bm.markDirty(p * 4096n, 4096n);
    const out = bm.report(3n * 4096n, 197n * 4096n, 4096n);
    const got: bigint[] = [];
    const view = new DataView(out.buffer);
    for (let w = 0; w < out.length / 8; w++) {
      const word = view.getBigUint64(w * 8, true);
      for (let i = 0n; i < 64n; i++) if ((word >> i) & 1n) got.push(BigInt(w) * 64n + i + 3n);
    }
    expect(got).toEqual(dirty);
    expect(bm.countDirty()).toBe(0);
  });

  it("works at the top of the u64 space", () => {
    const T = 4096n;
    const base = TOP - 128n * T;
    const bm = new DirtyBitmap(base, 128n * T, T);
    bm.markDirty(TOP - 1n, 1n); // the last byte of the address space
    bm.markDirty(TOP - T - 1n, 1000n * T); // runs past 2^64: clipped at the end
    bm.markDirty(base - 10n, 11n); // straddles the start
    expect(bm.countDirty()).toBe(3);
    const out = bm.report(TOP - 64n * T, 64n * T, T);
    const last = new DataView(out.buffer).getBigUint64(0, true);
    expect(last).toBe((1n << 63n) | (1n << 62n));
    expect(bm.report(base, T, T)[0]).toBe(1);
    expect(bm.countDirty()).toBe(0);
    expectEinval(() => new DirtyBitmap(TOP - T, 2n * T, T), /u64/);
  });

  it("refuses bad report ranges with EINVAL", () => {
    const bm = new DirtyBitmap(0x100000n, 0x100000n, 0x1000n);
    expectEinval(() => bm.report(0x100800n, 0x1000n, 0x1000n), /aligned/);
    expectEinval(() => bm.report(0x100000n, 0x1800n, 0x1000n), /aligned/);
    expectEinval(() => bm.report(0x100000n, 0n, 0x1000n), /zero/);
    expectEinval(() => bm.report(0x0ff000n, 0x2000n, 0x1000n), /outside/);
    expectEinval(() => bm.report(0x1ff000n, 0x2000n, 0x1000n), /outside/);
    expectEinval(() => bm.report(0x100000n, 0x3000n, 0x3000n), /power of two/);
    // Report page larger than the tracked range.
    expectEinval(() => bm.report(0n, 0x400000n, 0x400000n), /outside/);
  });

  it("refuses bad tracking ranges", () => {
    expectEinval(() => new DirtyBitmap(0x800n, 0x1000n, 0x1000n), /aligned/);
    expectEinval(() => new DirtyBitmap(0n, 0x1800n, 0x1000n), /aligned/);
    expectEinval(() => new DirtyBitmap(0n, 0n, 0x1000n));
    expectEinval(() => new DirtyBitmap(0n, 0x3000n, 0x3000n), /power of two/);
    expect(() => new DirtyBitmap(0n, 1n << 50n, 4096n)).toThrowError(expect.objectContaining({ errno: Errno.ENOMEM }));
  });

  it("clear() forgets everything", () => {
    const bm = new DirtyBitmap(0n, 1n << 20n, 4096n);
    bm.markDirty(0n, 1n << 20n);
    expect(bm.countDirty()).toBe(256);
    bm.clear();
    expect(bm.countDirty()).toBe(0);
    expect([...bm.report(0n, 1n << 20n, 4096n)].every((b) => b === 0)).toBe(true);
  });
});

describe("DirtyLog", () => {
  const T = 4096n;
  const ranges: IovaRange[] = [
    { iova: 0x100000000n, length: 300n * T }, // given out of order on purpose
    { iova: 0n, length: 0xa0n * T },
    { iova: 0xc0000n, length: 77n * T },
    { iova: 0xc0000n + 77n * T, length: 20n * T }, // adjacent to the previous
  ];

  it("routes writes by address and matches the model", () => {
    for (const seed of [7, 8, 9]) {
      const r = rng(seed);
      const log = new DirtyLog(ranges, T);
      const model = new Model(ranges, T);
      for (let op = 0; op < 400; op++) {
        if (r() < 0.7) {
          const pick = ranges[Math.floor(r() * ranges.length)]!;
          const addr = pick.iova - 4n * T + randBig(r, pick.length + 8n * T);
          const a = addr < 0n ? 0n : addr;
          const l = 1n + randBig(r, 40n * T);
          log.markDirty(a, l);
          model.markDirty(a, l);
        } else {
          const pick = ranges[Math.floor(r() * ranges.length)]!;
          const R = [T, 2n * T, 16n * T, T / 4n][Math.floor(r() * 4)]!;
          const w = randomWindow(r, pick.iova, pick.length, R);
          if (w === null) continue;
          expect(hexdump(log.report(w.iova, w.length, R))).toBe(hexdump(model.report(w.iova, w.length, R)));
        }
        expect(log.countDirty()).toBe(model.dirty.size);
      }
    }
  });

  it("a write spanning adjacent ranges dirties both", () => {
    const log = new DirtyLog(ranges, T);
    log.markDirty(0xc0000n + 76n * T, 2n * T);
    expect(log.isDirty(0xc0000n + 76n * T)).toBe(true);
    expect(log.isDirty(0xc0000n + 77n * T)).toBe(true);
    expect(log.countDirty()).toBe(2);
  });

  it("refuses a report across two ranges, in a gap, or outside", () => {
    const log = new DirtyLog(ranges, T);
    expectEinval(() => log.report(0xc0000n + 76n * T, 2n * T, T), /one tracked range/);
    expectEinval(() => log.report(0xa0n * T, T, T), /one tracked range/);
    expectEinval(() => log.report(0x200000000n, T, T), /one tracked range/);
  });

  it("refuses overlapping or no ranges, and the page budget covers all ranges", () => {
    expectEinval(() => new DirtyLog([], T));
    expectEinval(
      () =>
        new DirtyLog(
          [
            { iova: 0n, length: 2n * T },
            { iova: T, length: 2n * T },
          ],
          T,
        ),
      /overlap/,
    );
    expect(
      () =>
        new DirtyLog(
          [
            { iova: 0n, length: 60n * T },
            { iova: 100n * T, length: 60n * T },
          ],
          T,
          { maxPages: 100 },
        ),
    ).toThrowError(expect.objectContaining({ errno: Errno.ENOMEM }));
  });
});

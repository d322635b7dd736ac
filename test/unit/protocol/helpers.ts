/** Test helpers: hex fixtures and a seeded PRNG. */

/** Bytes from a hex string; whitespace and `|` are ignored so fixtures can mirror the spec's tables. */
export function hex(s: string): Buffer {
  const clean = s.replace(/[\s|]+/g, "");
  if (!/^([0-9a-fA-F]{2})*$/.test(clean)) throw new Error(`bad hex fixture: ${s}`);
  return Buffer.from(clean, "hex");
}

/** Normalized hex of some bytes, for readable assertion failures. */
export function toHex(b: Uint8Array): string {
  return Buffer.from(b.buffer, b.byteOffset, b.byteLength).toString("hex");
}

/** mulberry32: a tiny deterministic PRNG returning floats in [0, 1). */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** A random integer in [0, n). */
export function randInt(rand: () => number, n: number): number {
  return Math.floor(rand() * n);
}

/** A random u32. */
export function randU32(rand: () => number): number {
  return randInt(rand, 0x1_0000_0000);
}

/** A random u64 as bigint. */
export function randU64(rand: () => number): bigint {
  return (BigInt(randU32(rand)) << 32n) | BigInt(randU32(rand));
}

/**
 * The one place 64-bit wire fields are handled. Every IOVA, offset and size
 * is a bigint end to end; a Number would silently lose bits above 2^53.
 */
export const U64_MAX = (1n << 64n) - 1n;
export const U32_MAX = 0xffff_ffff;

export function readU64(view: DataView, offset: number): bigint {
  return view.getBigUint64(offset, true);
}

export function writeU64(view: DataView, offset: number, value: bigint): void {
  if (value < 0n || value > U64_MAX) throw new RangeError(`u64 out of range: ${value}`);
  view.setBigUint64(offset, value, true);
}

/** True when `offset + count` wraps past 2^64 or exceeds `limit`. */
export function rangeExceeds(offset: bigint, count: bigint, limit: bigint): boolean {
  const end = offset + count;
  return end > U64_MAX || end > limit;
}

/**
 * A bigint that must fit a JS Number for use as a buffer index or length.
 * Throws RangeError rather than rounding.
 */
export function toSafeNumber(value: bigint): number {
  if (value < 0n || value > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new RangeError(`value does not fit a safe integer: ${value}`);
  }
  return Number(value);
}

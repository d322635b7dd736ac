/**
 * Statistics for the bench table (test/bench/run.ts): medians, percentiles
 * and ratios over a handful of runs. Pure functions, no I/O; unit-tested in
 * test/unit/bench/stats.test.ts.
 */

/** Ascending copy; NaN entries (failed runs) are dropped. */
function sorted(xs: readonly number[]): number[] {
  return xs.filter((x) => !Number.isNaN(x)).sort((a, b) => a - b);
}

/** Median: the middle value, or the mean of the two middle values; NaN for no values. */
export function median(xs: readonly number[]): number {
  const s = sorted(xs);
  if (s.length === 0) return NaN;
  const mid = s.length >> 1;
  return s.length % 2 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
}

/**
 * Nearest-rank percentile (p in (0, 100]): the smallest value with at least
 * p% of the values at or below it. The same rule as client.c's
 * `t[floor(n * 0.99)]` for n a multiple of 100. NaN for no values.
 */
export function percentile(xs: readonly number[], p: number): number {
  if (!(p > 0 && p <= 100)) throw new RangeError(`percentile ${p} is not in (0, 100]`);
  const s = sorted(xs);
  if (s.length === 0) return NaN;
  const rank = Math.ceil((p / 100) * s.length);
  return s[Math.min(s.length, Math.max(1, rank)) - 1]!;
}

export const p99 = (xs: readonly number[]): number => percentile(xs, 99);

export function mean(xs: readonly number[]): number {
  const s = sorted(xs);
  return s.length === 0 ? NaN : s.reduce((a, b) => a + b, 0) / s.length;
}

/** a / b, NaN when either is missing or b is 0. */
export function ratio(a: number, b: number): number {
  return Number.isFinite(a) && Number.isFinite(b) && b !== 0 ? a / b : NaN;
}

/** A target as a ratio bound: "met" / "not met", or "" when the ratio is unknown. */
export function verdict(value: number, bound: number, cmp: "<=" | ">="): "met" | "not met" | "" {
  if (!Number.isFinite(value)) return "";
  return (cmp === "<=" ? value <= bound : value >= bound) ? "met" : "not met";
}

import { describe, expect, it } from "vitest";
import { mean, median, p99, percentile, ratio, verdict } from "../../bench/stats.ts";

describe("bench stats", () => {
  it("median of odd and even counts, unsorted input", () => {
    expect(median([5, 1, 3])).toBe(3);
    expect(median([4, 1, 3, 2])).toBe(2.5);
    expect(median([7])).toBe(7);
    expect(median([])).toBeNaN();
  });

  it("median ignores NaN (failed runs) and does not reorder its input", () => {
    const xs = [9, NaN, 1, 5];
    expect(median(xs)).toBe(5);
    expect(xs).toEqual([9, NaN, 1, 5]);
  });

  it("p99 by nearest rank", () => {
    const hundred = Array.from({ length: 100 }, (_, i) => i + 1); // 1..100
    expect(p99(hundred)).toBe(99);
    const thousand = Array.from({ length: 1000 }, (_, i) => 1000 - i); // 1000..1
    expect(p99(thousand)).toBe(990);
    expect(p99([3, 1, 2])).toBe(3);
    expect(p99([42])).toBe(42);
    expect(p99([])).toBeNaN();
  });

  it("other percentiles and bad arguments", () => {
    const xs = [10, 20, 30, 40];
    expect(percentile(xs, 50)).toBe(20);
    expect(percentile(xs, 100)).toBe(40);
    expect(percentile(xs, 1)).toBe(10);
    expect(() => percentile(xs, 0)).toThrow(RangeError);
    expect(() => percentile(xs, 101)).toThrow(RangeError);
  });

  it("mean, ratio, verdict", () => {
    expect(mean([1, 2, 3, 6])).toBe(3);
    expect(ratio(3, 2)).toBe(1.5);
    expect(ratio(1, 0)).toBeNaN();
    expect(ratio(NaN, 2)).toBeNaN();
    expect(verdict(1.05, 1.1, "<=")).toBe("met");
    expect(verdict(1.2, 1.1, "<=")).toBe("not met");
    expect(verdict(2.5, 2, ">=")).toBe("met");
    expect(verdict(NaN, 2, ">=")).toBe("");
  });
});

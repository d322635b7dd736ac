/** The option-schema helper every device uses for --opt (src/device/options.ts). */
import { describe, expect, expectTypeOf, it } from "vitest";
import { DEVICES } from "../../../devices/index.ts";
import { defineOptions, describeOptions, formatSize, OptionError, parseOptions, parseSize } from "../../../src/index.ts";

const schema = defineOptions({
  count: { type: "integer", min: 1, max: 8, default: 2, description: "how many" },
  mask: { type: "bigint", max: (1n << 64n) - 1n },
  mem: { type: "size", powerOfTwo: true, min: 4096n, default: 1n << 20n },
  fast: { type: "boolean", default: false },
  mode: { type: "string", choices: ["a", "b"], default: "a" },
});

describe("parseOptions", () => {
  it("fills defaults and types the values", () => {
    const v = parseOptions("dev", schema, {});
    expect(v).toEqual({ count: 2, mask: undefined, mem: 1n << 20n, fast: false, mode: "a" });
    expectTypeOf(v.count).toEqualTypeOf<number>();
    expectTypeOf(v.mask).toEqualTypeOf<bigint | undefined>();
    expectTypeOf(v.mem).toEqualTypeOf<bigint>();
    expectTypeOf(v.fast).toEqualTypeOf<boolean>();
  });

  it("parses each type", () => {
    expect(parseOptions("dev", schema, { count: "0x8", mask: "0xffffffffffffffff", mem: "64K", fast: "yes", mode: "b" })).toEqual({
      count: 8,
      mask: (1n << 64n) - 1n,
      mem: 64n << 10n,
      fast: true,
      mode: "b",
    });
  });

  it.each([
    [{ nope: "1" }, "dev: unknown option 'nope' (known: count, mask, mem, fast, mode)"],
    [{ count: "abc" }, "dev: count=abc: 'abc' is not an integer (decimal, or hex with 0x)"],
    [{ count: "9" }, "dev: count=9: 9 is out of range (1..8)"],
    [{ count: "1.5" }, "dev: count=1.5: '1.5' is not an integer (decimal, or hex with 0x)"],
    [{ mask: "abc" }, "dev: mask=abc: 'abc' is not an integer (decimal, or hex with 0x)"],
    [{ mask: "0x10000000000000000" }, "dev: mask=0x10000000000000000: 0x10000000000000000 is out of range (<= 0xffffffffffffffff)"],
    [{ mem: "3M" }, "dev: mem=3M: 3M is not a power of two"],
    [{ mem: "1K" }, "dev: mem=1K: 1K is out of range (>= 4K)"],
    [{ mem: "lots" }, "dev: mem=lots: 'lots' is not a size like 4096, 64K, 256M or 1G"],
    [{ fast: "maybe" }, "dev: fast=maybe: 'maybe' is not a boolean (true/false, 1/0, yes/no, on/off)"],
    [{ mode: "c" }, "dev: mode=c: 'c' is not one of a, b"],
  ])("%j is refused: %s", (given, message) => {
    expect(() => parseOptions("dev", schema, given)).toThrow(new OptionError(message));
  });

  it("a device without options refuses every key", () => {
    expect(() => parseOptions("plain", {}, { x: "1" })).toThrow("plain: unknown option 'x' (it takes no options)");
  });
});

describe("sizes and descriptions", () => {
  it("parses and formats sizes", () => {
    expect(parseSize("4096")).toBe(4096n);
    expect(parseSize("0x1000")).toBe(4096n);
    expect(parseSize("256M")).toBe(256n << 20n);
    expect(parseSize("1GiB")).toBe(1n << 30n);
    expect(formatSize(256n << 20n)).toBe("256M");
    expect(formatSize(4097n)).toBe("4097");
  });

  it("describes each option: type, range, default, words", () => {
    expect(describeOptions(schema)).toEqual([
      "count  integer, 1..8, default 2                 how many",
      "mask   integer (64-bit), <= 0xffffffffffffffff",
      "mem    size, power of two, >= 4K, default 1M",
      "fast   boolean, default false",
      "mode   one of a|b, default a",
    ]);
  });

  it("every shipped device declares its options", () => {
    for (const d of DEVICES) expect(d.options, d.name).toBeDefined();
  });
});

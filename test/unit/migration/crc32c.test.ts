import { randomBytes } from "node:crypto";
import { describe, expect, it } from "vitest";
import { crc32c } from "../../../src/migration/crc32c.ts";
import { native } from "../../../src/transport/native.ts";
import { refCrc32c as reference } from "./crc32c-reference.ts";

describe("crc32c (addon)", () => {
  it("check values: '123456789', empty, 32 zero bytes, 32 0xff bytes (RFC 3720 B.4)", () => {
    for (const f of [crc32c, native.crc32cPortable]) {
      expect(f(Buffer.from("123456789"))).toBe(0xe3069283);
      expect(f(new Uint8Array(0))).toBe(0);
      expect(f(new Uint8Array(32))).toBe(0x8a9136aa);
      expect(f(new Uint8Array(32).fill(0xff))).toBe(0x62a8ab43);
    }
  });

  // lengths around the three-lane block sizes (3 x 256, 3 x 8192) and unaligned starts
  const sizes = [1, 7, 8, 9, 767, 768, 769, 1000, 24_575, 24_576, 24_577, 100_003, 1 << 20];
  it("matches the bit-by-bit definition at every size and alignment, hardware and portable paths", () => {
    const buf = randomBytes((1 << 20) + 16);
    for (const n of sizes) {
      for (const start of [0, 1, 3, 7]) {
        const v = buf.subarray(start, start + n);
        const want = reference(v);
        expect(crc32c(v), `n=${n} start=${start}`).toBe(want);
        expect(native.crc32cPortable(v), `portable n=${n} start=${start}`).toBe(want);
      }
    }
  });

  it("chains: crc32c(B, crc32c(A)) === crc32c(A || B), for any split", () => {
    const buf = randomBytes(70_001);
    const whole = crc32c(buf);
    for (const cut of [0, 1, 8, 767, 24_576, 50_000, 70_001]) {
      expect(crc32c(buf.subarray(cut), crc32c(buf.subarray(0, cut)))).toBe(whole);
    }
  });

  it("refuses what is not a Uint8Array", () => {
    expect(() => crc32c("abc" as unknown as Uint8Array)).toThrowError(/Uint8Array/);
    expect(() => crc32c(new Uint16Array(4) as unknown as Uint8Array)).toThrowError(/Uint8Array/);
  });
});

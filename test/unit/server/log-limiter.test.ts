import { describe, expect, it } from "vitest";
import { LogLimiter } from "../../../src/server/log-limiter.ts";

describe("LogLimiter", () => {
  it("lets a burst through, then one line per interval carrying the suppressed count", () => {
    let t = 0;
    const l = new LogLimiter({ burst: 3, perSecond: 1, now: () => t });
    expect([l.take("a"), l.take("a"), l.take("a")]).toEqual([0, 0, 0]);
    expect(l.take("a")).toBe(-1);
    expect(l.take("a")).toBe(-1);
    t += 999;
    expect(l.take("a")).toBe(-1);
    t += 1;
    expect(l.take("a")).toBe(3);
    expect(l.take("a")).toBe(-1);
    expect(l.totalSuppressed).toBe(4);
  });

  it("keeps keys apart", () => {
    const l = new LogLimiter({ burst: 1, now: () => 0 });
    expect(l.take("a")).toBe(0);
    expect(l.take("b")).toBe(0);
    expect(l.take("a")).toBe(-1);
  });
});

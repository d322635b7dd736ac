/**
 * The e2e harness's log sink: marks count every line written, so they stay
 * valid when the sink lets old lines go; the bulk trace lines go first, the
 * lines tests look for (migration states, refusals) stay.
 */
import { describe, expect, it } from "vitest";
import { LogCapture } from "../../e2e/harness/server.ts";

const state = (n: number) => JSON.stringify({ level: 30, msg: "migration state", from: "A", now: String(n) });
const trace = (n: number, cmd = "MIG_DATA_READ") => JSON.stringify({ level: 30, msg: "recv", cmd, msgId: n });

describe("LogCapture", () => {
  it("marks survive shedding; bulk trace lines are shed before anything else", () => {
    const log = new LogCapture(100, false);
    log.write(state(0) + "\n");
    const mark = log.length;
    log.write(state(1) + "\n" + trace(0, "DEVICE_RESET") + "\n");
    for (let i = 0; i < 1000; i++) log.write(trace(i) + "\n");
    log.write(state(2) + "\n");
    expect(log.length).toBe(1004);
    const recs = log.records(mark);
    expect(recs.filter((r) => r.msg === "migration state").map((r) => r.now)).toEqual(["1", "2"]);
    expect(recs.filter((r) => r.cmd === "DEVICE_RESET")).toHaveLength(1);
    expect(log.raw().length).toBeLessThanOrEqual(100);
    // a mark taken before any shedding still means "from here on"
    expect(log.records(log.length - 1).map((r) => r.now)).toEqual(["2"]);
  });

  it("without shedding, raw(mark) is exactly the lines after the mark", () => {
    const log = new LogCapture(10, false);
    log.write("a\nb\n");
    const m = log.length;
    log.write("c\n");
    expect(log.raw(m)).toEqual(["c"]);
    expect(log.raw()).toEqual(["a", "b", "c"]);
  });
});

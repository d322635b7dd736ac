/**
 * Leak check in bounded time: 4,000 warm-up cycles, then 2,000 measured
 * cycles of connect / VERSION / DMA_MAP (1 MiB memfd) / SET_IRQS (eventfd) /
 * a refused request carrying an fd / REGION_READ / disconnect (every 10th by
 * a frame-level fault) against a child-process server. `npx tsx
 * test/fuzz/leak.ts --cycles 10000` runs the long version with the same
 * verdicts.
 *
 * Asserted (margins and their reasons: leakVerdicts in test/fuzz/leak.ts):
 * the server's fds exactly back, no mapping of a cycle's memfd left, V8 heap
 * used / external / arrayBuffers after GC within +1 MiB each, and the
 * server's own accounting (decoder at most one VERSION frame, send queue at
 * most one reply). RSS is printed, not asserted: after GC it moves with the
 * allocator's high-water marks (~15 MiB over the first 4,000 cycles, and
 * differently from run to run) while the V8 figures stay flat.
 */
import { afterAll, beforeAll, expect, it } from "vitest";
import { formatLeak, leakVerdicts, runLeakCycles } from "../fuzz/leak.ts";
import { ChildServer, memfdMappings } from "./raw-client.ts";

let s: ChildServer;

beforeAll(async () => {
  s = await ChildServer.start();
});
afterAll(() => s?.stop());

it("2,000 connect/map/irq/disconnect cycles: fds exactly back, no memfd mapped, V8 memory and the server's high-water marks within their bounds", async () => {
  const r = await runLeakCycles(s, 2000, { warmup: 4000 });
  console.log(formatLeak(r));
  expect(memfdMappings(s.pid, "leak-cycle")).toBe(0);
  expect(leakVerdicts(r).filter((v) => !v.ok).map((v) => v.what)).toEqual([]);
}, 90_000);

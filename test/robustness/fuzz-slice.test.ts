/**
 * A bounded slice of the fuzzer (test/fuzz/fuzzer.ts) in CI: up to 400,000
 * messages or 60 s against a child-process edu server, health probe every
 * 1,000 messages with the server's fds checked back at their start each
 * time. Asserts no crash, no hang, no fd left over, and after a full GC the
 * V8 heap within 8 MiB (measured: +1.5..+2 MiB) and RSS within 128 MiB of
 * the start. RSS climbs in steps to a plateau while the heap stays put:
 * measured +25..+51 MiB at 150k..400k messages, and in a 10^6-message run
 * 116..125 MiB up to 524k, one step to 156 MiB, flat from 600k to 10^6.
 *
 * FUZZ_SEED=<n> replays a run; the seed is in the summary line and in every
 * failure.
 */
import { expect, it } from "vitest";
import { runFuzz, summary } from "../fuzz/fuzzer.ts";

it("fuzz slice: no crash, no hang, fds flat, RSS bounded", async () => {
  const seed = process.env["FUZZ_SEED"] !== undefined ? Number(process.env["FUZZ_SEED"]) >>> 0 : (Date.now() ^ (process.pid << 16)) >>> 0;
  const r = await runFuzz({
    seed,
    messages: 400_000,
    timeLimitMs: 60_000,
    probeEvery: 1000,
    strictFds: true,
    log: () => {},
  });
  console.log(summary(r));
  for (const f of r.failures) console.log(f);
  expect(r.failures, `seed ${seed}`).toEqual([]);
  expect(r.crashes).toBe(0);
  expect(r.hangs).toBe(0);
  expect(r.leaks).toBe(0);
  expect(r.fdsEnd, `seed ${seed}`).toBe(r.fdsStart);
  expect(r.rssEnd - r.rssStart, `seed ${seed}`).toBeLessThan(128 << 20);
  expect(r.heapEnd - r.heapStart, `seed ${seed}`).toBeLessThan(8 << 20);
  expect(r.messages).toBeGreaterThanOrEqual(30_000);
  expect(r.probes).toBeGreaterThan(10);
}, 120_000);

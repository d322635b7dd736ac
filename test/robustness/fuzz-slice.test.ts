/**
 * A bounded, repeatable slice of the fuzzer (test/fuzz/fuzzer.ts) in CI:
 * three fixed seeds, MESSAGES messages each (a message count, not a time
 * limit, so a slow machine runs the same slice, only slower), against a
 * child-process edu server, health probe every 1,000 messages with the
 * server's fds checked back at their start each time. Random seeds are for
 * `npm run fuzz` only.
 *
 * Asserted per seed: no crash, no hang, no fd left over at any probe or at
 * the end; the server's own accounting within what its design allows (the
 * decoder never held more than one largest frame, the send queue never more
 * than SEND_HIGH_WATER plus one frame); and V8 memory after a full GC within
 * margins of the start: heap used +4 MiB (measured +1.6 MiB over 100,000
 * messages for each seed: compiled code and inline caches of paths first
 * taken during the run, not objects held for clients), external and arrayBuffers +1 MiB each
 * (measured +0.0: every buffer a connection holds goes with it). RSS is in
 * the summary line, not asserted (it measured +25..+51 MiB with the heap
 * flat: the allocator's high-water marks).
 *
 * Every assertion message carries the seed; a failure replays (as far as
 * the server's timing allows) with the command printed next to it.
 */
import { describe, expect, it } from "vitest";
import { maxFrameSizeFor } from "../../protocol/index.ts";
import { SEND_HIGH_WATER } from "../../src/transport/unix-socket.ts";
import { runFuzz, summary } from "../fuzz/fuzzer.ts";

const SEEDS = [0x5eed0001, 0x5eed0002, 0x5eed0003];
const MESSAGES = 100_000;
const PROBE_EVERY = 1000;
/** The fuzzer offers max_data_xfer_size of at most 1 MiB, and the server's own limit is 1 MiB. */
const MAX_FRAME = maxFrameSizeFor(1 << 20);
const HEAP_MARGIN = 4 << 20;
const BUFFER_MARGIN = 1 << 20;

describe("fuzz slice (fixed seeds, message-count limit)", () => {
  for (const seed of SEEDS) {
    it(`seed ${seed}: ${MESSAGES} messages, no crash, no hang, fds back at every probe; decoder, send queue and V8 memory within bounds`, async () => {
      const r = await runFuzz({ seed, messages: MESSAGES, probeEvery: PROBE_EVERY, strictFds: true, log: () => {} });
      const replay = `npm run fuzz -- --seed ${seed} --messages ${MESSAGES} --probe-every ${PROBE_EVERY} --strict-fds`;
      const at = `seed ${seed} (replay: ${replay})`;
      console.log(summary(r));
      for (const f of r.failures) console.log(f);
      expect(r.failures, at).toEqual([]);
      expect(r.crashes, at).toBe(0);
      expect(r.hangs, at).toBe(0);
      expect(r.leaks, at).toBe(0);
      expect(r.messages, at).toBe(MESSAGES);
      // one before the first message, one each time another PROBE_EVERY messages went out, one at the end
      expect(r.probes, at).toBe(1 + Math.floor((MESSAGES - 1) / PROBE_EVERY) + 1);
      expect(r.fdsEnd, at).toBe(r.fdsStart);
      expect(r.stats, at).not.toBeNull();
      expect(r.stats!.decoderHighWater, at).toBeLessThanOrEqual(MAX_FRAME);
      expect(r.stats!.sendQueueHighWater, at).toBeLessThanOrEqual(SEND_HIGH_WATER + MAX_FRAME);
      expect(r.heapEnd - r.heapStart, at).toBeLessThan(HEAP_MARGIN);
      expect(r.externalEnd - r.externalStart, at).toBeLessThan(BUFFER_MARGIN);
      expect(r.arrayBuffersEnd - r.arrayBuffersStart, at).toBeLessThan(BUFFER_MARGIN);
    }, 300_000);
  }
});

/**
 * Refusals are visible at the default log level (issue 9, part 2, item 12).
 *
 * A client that gets a request wrong (a DMA_LOGGING_START, a SET_IRQS, a
 * MIG_DEVICE_STATE...) used to leave no trace unless the server ran at
 * debug. Each refusal is now one "request refused" line at info with msgId,
 * cmd, errno and reason, rate limited per command (a burst of 20, then one a
 * second), so a flood of one bad command neither fills the log nor hides
 * the refusal of another.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { COMMAND_NAMES, Command, Errno, Feature, FeatureFlags, IrqSetFlags, RegionIndex } from "../../protocol/index.ts";
import { RawClient, eventually, le, startInProcessServer, type InProcessServer, type LogLine } from "./raw-client.ts";

const INFO = 30;
const FLOOD = 2000;
const BURST = 20;

let srv: InProcessServer;
beforeAll(() => {
  srv = startInProcessServer({ logLevel: "info" });
});
afterAll(() => srv?.stop());

async function connected(fn: (c: RawClient) => Promise<void>): Promise<void> {
  expect(await eventually(() => srv.server.connection === null)).toBe(true);
  const c = await RawClient.ready(srv.socketPath);
  try {
    await fn(c);
  } finally {
    c.close();
    await c.waitClosed();
  }
}

const refusals = (since: number): LogLine[] => srv.logs.slice(since).filter((l) => l.msg === "request refused");

const loggingStartNothingMapped = le().u32(8 + 16).u32(Feature.DMA_LOGGING_START | FeatureFlags.SET).u64(4096).u32(0).u32(0).buf;
const setIrqsIndex5 = le().u32(20).u32(IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER).u32(5).u32(0).u32(1).buf;
const migStateError = le().u32(16).u32(Feature.MIG_DEVICE_STATE | FeatureFlags.SET).u32(0).s32(-1).buf;

describe("a refused request logs one line at info with cmd, errno and reason", () => {
  const cases: [string, number, Buffer, number][] = [
    ["DMA_LOGGING_START of all memory with nothing mapped", Command.DEVICE_FEATURE, loggingStartNothingMapped, Errno.EINVAL],
    ["SET_IRQS on IRQ index 5", Command.DEVICE_SET_IRQS, setIrqsIndex5, Errno.EINVAL],
    ["MIG_DEVICE_STATE SET to ERROR", Command.DEVICE_FEATURE, migStateError, Errno.EINVAL],
    ["REGION_READ of the VGA region", Command.REGION_READ, le().u64(0).u32(RegionIndex.VGA).u32(4).buf, Errno.EINVAL],
  ];
  for (const [name, cmd, body, errno] of cases) {
    it(name, () =>
      connected(async (c) => {
        const mark = srv.logs.length;
        const msgId = c.send(cmd, body);
        expect((await c.reply(msgId)).header.error).toBe(errno);
        const lines = refusals(mark);
        expect(lines).toHaveLength(1);
        expect(lines[0]).toMatchObject({ level: INFO, msgId, cmd: COMMAND_NAMES[cmd], errno });
        expect(typeof lines[0]!.reason).toBe("string");
        expect((lines[0]!.reason as string).length).toBeGreaterThan(0);
      }));
  }
});

describe("rate limited per command", () => {
  it(`${FLOOD} refused SET_IRQS log at most a burst; a MIG_DEVICE_STATE refused in the middle of the flood is still logged`, () =>
    connected(async (c) => {
      const mark = srv.logs.length;
      for (let i = 0; i < FLOOD / 2; i++) c.send(Command.DEVICE_SET_IRQS, setIrqsIndex5);
      const mig = c.send(Command.DEVICE_FEATURE, migStateError);
      for (let i = 0; i < FLOOD / 2; i++) c.send(Command.DEVICE_SET_IRQS, setIrqsIndex5);
      expect(await c.vendorId()).toBe(0x1234);
      const lines = refusals(mark);
      const setIrqs = lines.filter((l) => l.cmd === "DEVICE_SET_IRQS");
      console.log(`${FLOOD} refused SET_IRQS -> ${setIrqs.length} "request refused" lines at info`);
      expect(setIrqs.length).toBeGreaterThan(0);
      expect(setIrqs.length).toBeLessThanOrEqual(BURST + 2);
      expect(lines.filter((l) => l.msgId === mig && l.cmd === "DEVICE_FEATURE")).toHaveLength(1);
    }));
});

import { describe, expect, it } from "vitest";
import { Command, Errno, MigState } from "../../../protocol/constants.ts";
import { commandAllowed } from "../../../src/server/command-rules.ts";

const ALL_STATES = Object.values(MigState);
const ALWAYS_OK = [
  Command.DMA_MAP, Command.DMA_UNMAP, Command.DEVICE_GET_INFO, Command.DEVICE_GET_REGION_INFO,
  Command.DEVICE_GET_REGION_IO_FDS, Command.DEVICE_GET_IRQ_INFO, Command.DEVICE_SET_IRQS,
  Command.REGION_READ, Command.REGION_WRITE, Command.REGION_WRITE_MULTI, Command.DEVICE_RESET, Command.DEVICE_FEATURE,
];

// expected: the set of states in which the command is legal after VERSION
const TABLE: Array<[string, number, readonly number[]]> = [
  ["MIG_DATA_READ", Command.MIG_DATA_READ, [MigState.PRE_COPY, MigState.PRE_COPY_P2P, MigState.STOP_COPY]],
  ["MIG_DATA_WRITE", Command.MIG_DATA_WRITE, [MigState.RESUMING]],
  ["MIG_GET_PRECOPY_INFO", Command.MIG_GET_PRECOPY_INFO, [MigState.PRE_COPY, MigState.PRE_COPY_P2P]],
  ["VERSION", Command.VERSION, []],
  ["DMA_READ", Command.DMA_READ, []],
  ["DMA_WRITE", Command.DMA_WRITE, []],
];

describe("commandAllowed", () => {
  it("allows only VERSION before negotiation", () => {
    for (const cmd of Object.values(Command)) {
      const v = commandAllowed(cmd, false, MigState.RUNNING);
      if (cmd === Command.VERSION) expect(v).toBeNull();
      else expect(v?.errno).toBe(Errno.EINVAL);
    }
  });

  for (const [name, cmd, legal] of TABLE) {
    it(`${name} is legal exactly in ${legal.length ? legal.join(",") : "no state"}`, () => {
      for (const s of ALL_STATES) {
        const v = commandAllowed(cmd, true, s);
        if (legal.includes(s)) expect(v).toBeNull();
        else expect(v).not.toBeNull();
      }
    });
  }

  it("server-to-client commands are refused with ENOTSUP", () => {
    expect(commandAllowed(Command.DMA_READ, true, MigState.RUNNING)?.errno).toBe(Errno.ENOTSUP);
    expect(commandAllowed(Command.DMA_WRITE, true, MigState.RUNNING)?.errno).toBe(Errno.ENOTSUP);
  });

  it("device access and setup commands are legal in every migration state", () => {
    for (const cmd of ALWAYS_OK) for (const s of ALL_STATES) expect(commandAllowed(cmd, true, s)).toBeNull();
  });
});

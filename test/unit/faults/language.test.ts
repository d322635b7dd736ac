/**
 * The fault language (docs/faults.md): golden parse results for every
 * trigger, action and modifier, and every syntax error with its column.
 */
import { describe, expect, it } from "vitest";
import { Command, Errno, Feature, IrqIndex, MigState } from "../../../protocol/constants.ts";
import { FaultSyntaxError, parseFault, type Fault } from "../../../src/faults/language.ts";

const base = { nth: 1, times: 1, in: null };

describe("fault language: golden parses", () => {
  const golden: [string, Omit<Fault, "source">][] = [
    ["arc=STOP_COPY>STOP,errno=EIO", { ...base, trigger: { kind: "arc", from: MigState.STOP_COPY, to: MigState.STOP }, action: { kind: "errno", errno: Errno.EIO } }],
    ["arc=pre_copy>stop_copy,error", { ...base, trigger: { kind: "arc", from: MigState.PRE_COPY, to: MigState.STOP_COPY }, action: { kind: "error", errno: Errno.EIO } }],
    ["arc=RESUMING>STOP,error,errno=EINVAL", { ...base, trigger: { kind: "arc", from: MigState.RESUMING, to: MigState.STOP }, action: { kind: "error", errno: Errno.EINVAL } }],
    ["arc=RUNNING_P2P>STOP,delay=250", { ...base, trigger: { kind: "arc", from: MigState.RUNNING_P2P, to: MigState.STOP }, action: { kind: "delay", ms: 250 } }],
    ["arc=STOP>RESUMING,errno=5,nth=2", { ...base, nth: 2, trigger: { kind: "arc", from: MigState.STOP, to: MigState.RESUMING }, action: { kind: "errno", errno: 5 } }],
    ["cmd=DMA_MAP,nth=3,errno=ENOSPC", { ...base, nth: 3, trigger: { kind: "cmd", command: Command.DMA_MAP }, action: { kind: "errno", errno: Errno.ENOSPC } }],
    ["cmd=region_read,delay=10,times=all", { ...base, times: null, trigger: { kind: "cmd", command: Command.REGION_READ }, action: { kind: "delay", ms: 10 } }],
    ["cmd=9,drop", { ...base, trigger: { kind: "cmd", command: Command.REGION_READ }, action: { kind: "drop" } }],
    ["cmd=MIG_DATA_READ,in=STOP_COPY,nth=1,short=64", { ...base, in: MigState.STOP_COPY, trigger: { kind: "cmd", command: Command.MIG_DATA_READ }, action: { kind: "short", bytes: 64 } }],
    ["cmd=MIG_DATA_READ,corrupt", { ...base, trigger: { kind: "cmd", command: Command.MIG_DATA_READ }, action: { kind: "corrupt", offset: 0 } }],
    ["cmd=MIG_DATA_READ,corrupt=0x30,nth=4,times=2", { ...base, nth: 4, times: 2, trigger: { kind: "cmd", command: Command.MIG_DATA_READ }, action: { kind: "corrupt", offset: 0x30 } }],
    ["cmd=MIG_GET_PRECOPY_INFO,initial=1M,dirty=0", { ...base, trigger: { kind: "cmd", command: Command.MIG_GET_PRECOPY_INFO }, action: { kind: "precopy", initial: 1048576n, dirty: 0n } }],
    ["cmd=MIG_GET_PRECOPY_INFO,dirty=4K,times=all", { ...base, times: null, trigger: { kind: "cmd", command: Command.MIG_GET_PRECOPY_INFO }, action: { kind: "precopy", initial: null, dirty: 4096n } }],
    ["feature=MIG_DATA_SIZE,size=1T,times=all", { ...base, times: null, trigger: { kind: "feature", feature: Feature.MIG_DATA_SIZE }, action: { kind: "size", bytes: 1n << 40n } }],
    ["feature=MIG_DATA_SIZE,size=0xffffffffffffffff", { ...base, trigger: { kind: "feature", feature: Feature.MIG_DATA_SIZE }, action: { kind: "size", bytes: (1n << 64n) - 1n } }],
    ["feature=DMA_LOGGING_START,errno=ENOMEM", { ...base, trigger: { kind: "feature", feature: Feature.DMA_LOGGING_START }, action: { kind: "errno", errno: Errno.ENOMEM } }],
    ["feature=dma_logging_report,nth=2,errno=EIO,in=PRE_COPY", { ...base, nth: 2, in: MigState.PRE_COPY, trigger: { kind: "feature", feature: Feature.DMA_LOGGING_REPORT }, action: { kind: "errno", errno: Errno.EIO } }],
    ["after=40,drop", { ...base, trigger: { kind: "after", messages: 40 }, action: { kind: "drop" } }],
    ["state=STOP_COPY,drop", { ...base, trigger: { kind: "state", state: MigState.STOP_COPY }, action: { kind: "drop" } }],
    ["irq=MSI:0,stall=500", { ...base, trigger: { kind: "irq", index: IrqIndex.MSI, vector: 0 }, action: { kind: "stall", ms: 500 } }],
    ["irq=msix,stall=forever,nth=2", { ...base, nth: 2, trigger: { kind: "irq", index: IrqIndex.MSIX, vector: null }, action: { kind: "stall", ms: null } }],
    ["irq=INTX:0,stall=0,in=RUNNING", { ...base, in: MigState.RUNNING, trigger: { kind: "irq", index: IrqIndex.INTX, vector: 0 }, action: { kind: "stall", ms: 0 } }],
  ];
  for (const [spec, want] of golden) {
    it(spec, () => {
      expect(parseFault(spec)).toEqual({ source: spec, ...want });
    });
  }
});

describe("fault language: every error names its column", () => {
  const errors: [string, string, number, RegExp][] = [
    ["empty spec", "", 1, /empty fault spec/],
    ["empty item", "arc=STOP_COPY>STOP,,errno=EIO", 20, /empty item/],
    ["trailing comma", "cmd=DMA_MAP,errno=EIO,", 23, /trailing ','/],
    ["leading comma", ",cmd=DMA_MAP,errno=EIO", 1, /empty item/],
    ["white space", "cmd=DMA_MAP, errno=EIO", 13, /white space/],
    ["no key", "=5,cmd=DMA_MAP", 1, /no key before '='/],
    ["unknown key", "cmd=DMA_MAP,errnum=EIO", 13, /unknown key 'errnum'/],
    ["key twice", "cmd=DMA_MAP,errno=EIO,errno=EPERM", 23, /'errno' given twice/],
    ["value missing", "cmd,errno=EIO", 1, /'cmd' needs a value/],
    ["empty value", "cmd=,errno=EIO", 5, /empty value/],
    ["value on a bare key", "cmd=DMA_MAP,drop=1", 18, /'drop' takes no value/],
    ["no trigger", "errno=EIO", 1, /no trigger/],
    ["two triggers", "cmd=DMA_MAP,arc=STOP>RUNNING,errno=EIO", 13, /two triggers \('cmd' and 'arc'\)/],
    ["no action", "cmd=DMA_MAP,nth=2", 18, /no action for cmd=DMA_MAP: give one of errno, delay, drop/],
    ["two actions", "cmd=DMA_MAP,errno=EIO,delay=5", 23, /two actions/],
    ["action of another trigger", "cmd=DMA_MAP,short=4", 13, /'short' is not an action of cmd=DMA_MAP/],
    ["error on a command", "cmd=DMA_MAP,error", 13, /'error' is not an action of cmd=DMA_MAP/],
    ["size on another feature", "feature=MIGRATION,size=4", 19, /'size' is not an action of feature=MIGRATION/],
    ["stall on an arc", "arc=STOP>RUNNING,stall=5", 18, /'stall' is not an action of arc=STOP>RUNNING/],
    ["errno on an interrupt", "irq=MSI,errno=EIO", 9, /'errno' is not an action of irq=MSI/],
    ["drop needed after after=", "after=3,errno=EIO", 9, /'errno' is not an action of after=3/],
    ["arc without '>'", "arc=STOP_COPY,errno=EIO", 5, /arc needs FROM>TO/],
    ["unknown state in an arc", "arc=STOP_COPY>HALT,errno=EIO", 15, /unknown migration state 'HALT'/],
    ["not an arc", "arc=STOP_COPY>PRE_COPY,errno=EIO", 5, /STOP_COPY>PRE_COPY is not an arc/],
    ["two hops are not an arc", "arc=RUNNING>STOP_COPY,errno=EIO", 5, /is not an arc/],
    ["unknown command", "cmd=DMA_MAPP,errno=EIO", 5, /unknown command 'DMA_MAPP'/],
    ["unknown command number", "cmd=14,errno=EIO", 5, /unknown command '14'/],
    ["a server-to-client command", "cmd=DMA_READ,errno=EIO", 5, /goes from the server to the client/],
    ["unknown feature", "feature=LOW_POWER,errno=EIO", 9, /unknown feature 'LOW_POWER'/],
    ["unknown errno", "cmd=DMA_MAP,errno=EWHAT", 19, /errno must be a name/],
    ["errno 0", "cmd=DMA_MAP,errno=0", 19, /errno must be a name .* or a number in \[1, 4095\]/],
    ["nth 0", "cmd=DMA_MAP,errno=EIO,nth=0", 27, /nth must be in \[1, 1000000000\], got 0/],
    ["nth not a number", "cmd=DMA_MAP,errno=EIO,nth=two", 27, /nth must be an integer, got 'two'/],
    ["times 0", "cmd=DMA_MAP,errno=EIO,times=0", 29, /times must be in/],
    ["times junk", "cmd=DMA_MAP,errno=EIO,times=some", 29, /times must be an integer/],
    ["negative delay", "cmd=DMA_MAP,delay=-1", 19, /delay must be an integer, got '-1'/],
    ["delay too long", "cmd=DMA_MAP,delay=600001", 19, /delay must be in \[0, 600000\]/],
    ["stall junk", "irq=MSI,stall=later", 15, /stall must be an integer/],
    ["short not bytes", "cmd=MIG_DATA_READ,short=lots", 25, /short must be a byte count/],
    ["short beyond u32", "cmd=MIG_DATA_READ,short=4G", 25, /does not fit a u32/],
    ["size beyond 64 bits", "feature=MIG_DATA_SIZE,size=16777216T", 28, /does not fit 64 bits/],
    ["corrupt offset junk", "cmd=MIG_DATA_READ,corrupt=x", 27, /corrupt must be an integer/],
    ["unknown interrupt", "irq=NMI,stall=5", 5, /unknown interrupt 'NMI'/],
    ["bad vector", "irq=MSI:x,stall=5", 9, /vector must be an integer/],
    ["INTx vector 1", "irq=INTX:1,stall=5", 10, /INTx has one vector/],
    ["in= on an arc", "arc=STOP>RUNNING,errno=EIO,in=STOP", 28, /'in' filters cmd, feature and irq triggers, not arc/],
    ["in= unknown state", "cmd=DMA_MAP,errno=EIO,in=LIMBO", 26, /unknown migration state 'LIMBO'/],
    ["after= not a number", "after=many,drop", 7, /after must be an integer/],
    ["state= unknown", "state=DONE,drop", 7, /unknown migration state 'DONE'/],
  ];
  for (const [name, spec, column, reason] of errors) {
    it(`${name}: '${spec}' -> column ${column}`, () => {
      let caught: unknown;
      try {
        parseFault(spec);
      } catch (e) {
        caught = e;
      }
      expect(caught).toBeInstanceOf(FaultSyntaxError);
      const e = caught as FaultSyntaxError;
      expect(e.reason).toMatch(reason);
      expect(e.column).toBe(column);
      expect(e.message).toBe(`column ${column}: ${e.reason}`);
      expect(e.spec).toBe(spec);
    });
  }
});

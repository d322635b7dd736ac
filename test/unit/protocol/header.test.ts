import { describe, expect, it } from "vitest";
import {
  COMMAND_NAMES,
  Command,
  HeaderFlags,
  commandHeader,
  decodeHeader,
  encodeErrorReply,
  encodeMessage,
  encodeReply,
  isCommand,
  isError,
  isKnownCommand,
  isNoReply,
  isReply,
  messageType,
  readHeader,
  writeHeader,
} from "../../../protocol/index.ts";
import { hex, toHex } from "./helpers.ts";

describe("header flags", () => {
  it("reads the type bits and the No_reply / Error bits (spec: Header)", () => {
    expect(isCommand(0x00)).toBe(true);
    expect(isReply(0x01)).toBe(true);
    expect(isReply(0x10)).toBe(false);
    expect(isNoReply(0x10)).toBe(true);
    expect(isNoReply(0x01)).toBe(false);
    expect(isError(0x21)).toBe(true);
    expect(isError(0x11)).toBe(false);
    expect(messageType(0x3f)).toBe(0xf);
    expect(isCommand(0x02)).toBe(false);
    expect(isReply(0x02)).toBe(false);
  });

  it("knows commands 1-13, 15-18 and the extension 19, not 0, 14 or 20", () => {
    for (const c of [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 15, 16, 17, 18, 19]) expect(isKnownCommand(c)).toBe(true);
    for (const c of [0, 14, 20, 0xffff]) expect(isKnownCommand(c)).toBe(false);
    expect(COMMAND_NAMES[Command.MIG_GET_PRECOPY_INFO]).toBe("MIG_GET_PRECOPY_INFO");
  });
});

describe("header codec", () => {
  it("reads and writes at an offset of a larger buffer", () => {
    const buf = Buffer.alloc(40, 0xee);
    const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
    writeHeader(view, 7, { msgId: 2, command: 9, size: 32, flags: 0, error: 0 });
    expect(toHex(buf.subarray(7, 23))).toBe(toHex(hex("0200 0900 20000000 00000000 00000000")));
    expect(buf[6]).toBe(0xee);
    expect(buf[23]).toBe(0xee);
    expect(readHeader(view, 7)).toEqual({ msgId: 2, command: 9, size: 32, flags: 0, error: 0 });
    expect(decodeHeader(buf, 7)).toEqual({ msgId: 2, command: 9, size: 32, flags: 0, error: 0 });
  });

  it("decodeHeader refuses fewer than 16 bytes", () => {
    expect(() => decodeHeader(Buffer.alloc(15))).toThrow(RangeError);
    expect(() => decodeHeader(Buffer.alloc(20), 5)).toThrow(RangeError);
  });
});

describe("encodeMessage", () => {
  it("computes size and keeps body parts as given", () => {
    const a = Buffer.from([1, 2, 3]);
    const b = Buffer.alloc(5, 9);
    const out = encodeMessage({ msgId: 7, command: Command.REGION_WRITE, flags: HeaderFlags.NO_REPLY, error: 0 }, [a, Buffer.alloc(0), b]);
    expect(out).toHaveLength(3);
    expect(out[1]).toBe(a);
    expect(out[2]).toBe(b);
    expect(toHex(out[0])).toBe(toHex(hex("0700 0a00 18000000 10000000 00000000")));
  });

  it("takes a single body or none", () => {
    expect(encodeMessage(commandHeader(1, Command.DEVICE_RESET))).toHaveLength(1);
    const single = encodeMessage(commandHeader(1, Command.VERSION, true), Buffer.from([0, 0, 0, 0]));
    expect(toHex(Buffer.concat(single))).toBe(toHex(hex("0100 0100 14000000 10000000 00000000 00000000")));
  });

  it("builds replies and error replies that echo msgId and command", () => {
    const req = { msgId: 0xbeef, command: Command.DMA_MAP };
    expect(toHex(Buffer.concat(encodeReply(req)))).toBe(toHex(hex("efbe 0200 10000000 01000000 00000000")));
    // spec: "If an error occurs, the reply message must only include the reply header."
    expect(toHex(Buffer.concat(encodeErrorReply(req, 17)))).toBe(toHex(hex("efbe 0200 10000000 21000000 11000000")));
    expect(() => encodeErrorReply(req, 0)).toThrow(RangeError);
  });
});

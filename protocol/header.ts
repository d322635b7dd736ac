/**
 * The 16-byte header in front of every vfio-user message (spec: "Header").
 *
 *   0  msg_id  u16   echoed in the reply
 *   2  command u16
 *   4  size    u32   whole message, header included
 *   8  flags   u32   bits 0-3 type, bit 4 No_reply, bit 5 Error
 *  12  error   u32   errno in an error reply; reserved in a command
 */
import { HEADER_SIZE, HeaderFlags } from "./constants.ts";
import { putU16, putU32, viewOf } from "./wire.ts";

export interface Header {
  /** Message ID, chosen by the sender of a command and echoed in its reply. */
  msgId: number;
  /** Command number (`Command.*`), also set in the reply. */
  command: number;
  /** Size of the entire message in bytes, header included. */
  size: number;
  /** Type bits and the No_reply / Error bits (`HeaderFlags`). */
  flags: number;
  /** Errno of an error reply; 0 otherwise. */
  error: number;
}

/** Reads a header at `offset` of `view` (no validation; see FrameDecoder for that). */
export function readHeader(view: DataView, offset = 0): Header {
  return {
    msgId: view.getUint16(offset, true),
    command: view.getUint16(offset + 2, true),
    size: view.getUint32(offset + 4, true),
    flags: view.getUint32(offset + 8, true),
    error: view.getUint32(offset + 12, true),
  };
}

/** Writes `h` at `offset` of `view`; throws RangeError for a field out of its width. */
export function writeHeader(view: DataView, offset: number, h: Header): void {
  putU16(view, offset, h.msgId, "msgId");
  putU16(view, offset + 2, h.command, "command");
  putU32(view, offset + 4, h.size, "size");
  putU32(view, offset + 8, h.flags, "flags");
  putU32(view, offset + 12, h.error, "error");
}

/** The header as a new 16-byte Buffer. */
export function encodeHeader(h: Header): Buffer {
  const buf = Buffer.allocUnsafe(HEADER_SIZE);
  writeHeader(viewOf(buf), 0, h);
  return buf;
}

/** Reads the header at `offset` of `bytes`; throws RangeError if fewer than 16 bytes remain. */
export function decodeHeader(bytes: Uint8Array, offset = 0): Header {
  if (offset < 0 || bytes.length - offset < HEADER_SIZE) {
    throw new RangeError(`header needs ${HEADER_SIZE} bytes at offset ${offset}, have ${bytes.length - offset}`);
  }
  return readHeader(viewOf(bytes), offset);
}

/** The message type held in bits 0-3 (`HeaderFlags.TYPE_COMMAND` or `TYPE_REPLY`). */
export function messageType(flags: number): number {
  return flags & HeaderFlags.TYPE_MASK;
}

/** True for a reply message. */
export function isReply(flags: number): boolean {
  return (flags & HeaderFlags.TYPE_MASK) === HeaderFlags.TYPE_REPLY;
}

/** True for a command message. */
export function isCommand(flags: number): boolean {
  return (flags & HeaderFlags.TYPE_MASK) === HeaderFlags.TYPE_COMMAND;
}

/** True when a command asks for no reply (spec: "No_reply"). */
export function isNoReply(flags: number): boolean {
  return (flags & HeaderFlags.NO_REPLY) !== 0;
}

/** True when a reply reports an error (spec: "Error"; the error field may still be 0). */
export function isError(flags: number): boolean {
  return (flags & HeaderFlags.ERROR) !== 0;
}

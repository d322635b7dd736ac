/**
 * VFIO_USER_VERSION (spec: "VFIO_USER_VERSION"). Request and reply share
 * one layout:
 *
 *   0  major u16
 *   2  minor u16
 *   4  data  UTF-8 JSON, NUL-terminated; optional
 *
 * The JSON itself is handled by `capabilities.ts`.
 */
import { MessageSize } from "../constants.ts";
import { fail } from "../errors.ts";
import { allocBody, needAtLeast, putU16, viewOf } from "../wire.ts";

/** A VERSION message, sent by the client first and answered in the same format. */
export interface VersionMessage {
  /** Protocol major version; the reply must echo the proposed one. */
  major: number;
  /** Protocol minor version; the reply's is <= the proposed one. */
  minor: number;
  /** The JSON text without its terminating NUL; "" when the message carries none. */
  data: string;
}

/** The client's proposal. */
export type VersionRequest = VersionMessage;
/** The server's answer: same major, minor <= proposed, capabilities a subset. */
export type VersionReply = VersionMessage;

const utf8 = new TextDecoder("utf-8", { fatal: true });

export function encodeVersion(msg: VersionMessage): Buffer {
  if (msg.data.includes("\0")) throw new RangeError("version data must not contain NUL");
  const text = msg.data.length === 0 ? 0 : Buffer.byteLength(msg.data, "utf8") + 1;
  const { buf, view } = allocBody(MessageSize.VERSION_FIXED + text);
  putU16(view, 0, msg.major, "major");
  putU16(view, 2, msg.minor, "minor");
  // spec: "version data ... (including terminating NUL)"; the NUL is the zero left by alloc
  if (text > 0) buf.write(msg.data, MessageSize.VERSION_FIXED, "utf8");
  return buf;
}

/**
 * Decodes a VERSION body. Data, when present, must be valid UTF-8 ending in
 * exactly one NUL (EINVAL otherwise).
 */
export function decodeVersion(body: Uint8Array): VersionMessage {
  needAtLeast(body, MessageSize.VERSION_FIXED, "VERSION");
  const view = viewOf(body);
  const major = view.getUint16(0, true);
  const minor = view.getUint16(2, true);
  if (body.length === MessageSize.VERSION_FIXED) return { major, minor, data: "" };
  // spec: "version data ... variable (including terminating NUL)"
  const end = body.length - 1;
  if (body[end] !== 0) throw fail.inval("VERSION: data is not NUL-terminated");
  const text = body.subarray(MessageSize.VERSION_FIXED, end);
  if (text.includes(0)) throw fail.inval("VERSION: NUL inside the version data");
  let data: string;
  try {
    data = utf8.decode(text);
  } catch {
    throw fail.inval("VERSION: version data is not valid UTF-8");
  }
  return { major, minor, data };
}

/** Encoders/decoders under the request/reply names, for symmetry with the other messages. */
export const encodeVersionRequest = encodeVersion;
export const decodeVersionRequest = decodeVersion;
export const encodeVersionReply = encodeVersion;
export const decodeVersionReply = decodeVersion;

/**
 * Field-level helpers shared by the message codecs: views over bodies,
 * length checks that fail with EINVAL, and range-checked little-endian
 * writers. Only fixed-width, little-endian access lives here.
 */
import { fail } from "./errors.ts";
import { U32_MAX, writeU64 } from "./u64.ts";

/** A DataView over exactly the bytes of `bytes` (no copy). */
export function viewOf(bytes: Uint8Array): DataView {
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/** `bytes` as a Buffer sharing the same memory (no copy). */
export function asBuffer(bytes: Uint8Array): Buffer {
  return Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/**
 * A zero-filled body of `size` bytes and a view on it. Small bodies are
 * slices of Node's shared pool (Buffer.allocUnsafe), zero-filled here:
 * every byte an encoder does not write (padding, reserved fields) is 0, as
 * with Buffer.alloc, but without a fresh on-heap buffer that taking the
 * DataView would then have to move off the heap. The buffer may share its
 * ArrayBuffer with others: use byteOffset/byteLength (viewOf) with it.
 */
export function allocBody(size: number): { buf: Buffer; view: DataView } {
  const buf = Buffer.allocUnsafe(size).fill(0);
  return { buf, view: viewOf(buf) };
}

/** Throws EINVAL unless the body holds at least `min` bytes (fact "body-size", at the body's end). */
export function needAtLeast(body: Uint8Array, min: number, what: string): void {
  if (body.length < min) {
    throw fail.inval(`${what}: body is ${body.length} bytes, need at least ${min}`).with({ rule: "body-size", offset: body.length });
  }
}

/** Throws EINVAL unless the body is exactly `size` bytes (fact "body-size", where the two lengths part). */
export function needExactly(body: Uint8Array, size: number, what: string): void {
  if (body.length !== size) {
    throw fail.inval(`${what}: body is ${body.length} bytes, expected ${size}`).with({ rule: "body-size", offset: Math.min(body.length, size) });
  }
}

/**
 * Throws EINVAL when a request's argsz cannot hold the fixed reply part
 * (spec: "Message sizes"); fact "argsz-too-small" at `offset` (argsz is the
 * first field of every struct that has one).
 */
export function needArgsz(argsz: number, min: number, what: string, offset = 0): void {
  if (argsz < min) throw fail.inval(`${what}: argsz ${argsz} is smaller than ${min}`).with({ rule: "argsz-too-small", offset });
}

/** Throws EINVAL when a field the spec says must be zero is not (fact "must-be-zero" at `offset`). */
export function needZero(value: number | bigint, field: string, what: string, offset?: number): void {
  if (value !== 0 && value !== 0n) throw fail.inval(`${what}: ${field} must be zero, got ${value}`).with({ rule: "must-be-zero", offset });
}

function checkInt(value: number, max: number, field: string): void {
  if (!Number.isInteger(value) || value < 0 || value > max) {
    throw new RangeError(`${field} out of range: ${value}`);
  }
}

export function putU16(view: DataView, offset: number, value: number, field: string): void {
  checkInt(value, 0xffff, field);
  view.setUint16(offset, value, true);
}

export function putU32(view: DataView, offset: number, value: number, field: string): void {
  checkInt(value, U32_MAX, field);
  view.setUint32(offset, value, true);
}

export function putS32(view: DataView, offset: number, value: number, field: string): void {
  if (!Number.isInteger(value) || value < -0x8000_0000 || value > 0x7fff_ffff) {
    throw new RangeError(`${field} out of range: ${value}`);
  }
  view.setInt32(offset, value, true);
}

export function putU64(view: DataView, offset: number, value: bigint): void {
  writeU64(view, offset, value);
}

/** Throws RangeError when a declared count disagrees with the data carried (encoder misuse). */
export function checkCount(count: number | bigint, dataLength: number, what: string): void {
  if (BigInt(count) !== BigInt(dataLength)) {
    throw new RangeError(`${what}: count ${count} does not match ${dataLength} data bytes`);
  }
}

/** Copies `head` then `data` into one new Buffer (the single-buffer form of a `...Parts` encoder). */
export function joinParts(parts: readonly Uint8Array[]): Buffer {
  return Buffer.concat(parts as Uint8Array[]);
}

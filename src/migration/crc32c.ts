/**
 * CRC-32C (Castagnoli), the migration stream's record check from stream
 * version 2 on: computed by the native addon (SSE4.2's crc32 instruction in
 * three lanes, about 3x zlib's CRC-32 in Node on the same machine; a
 * byte-wise table where the instruction is missing). Chains like zlib's
 * crc32: crc32c(B, crc32c(A)) === crc32c(A || B); crc32c("123456789") is
 * 0xe3069283.
 */
import { native } from "../transport/native.ts";

type Crc = (data: Uint8Array, crc?: number) => number;

const impl: Crc | undefined = typeof native.crc32c === "function" ? native.crc32c : undefined;

export function crc32c(data: Uint8Array, crc = 0): number {
  if (impl === undefined) {
    throw new Error("vfio-user-ts: the native addon predates crc32c (built from older sources): run `npm ci` to rebuild it");
  }
  return impl(data, crc);
}

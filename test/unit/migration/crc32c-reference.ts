/** CRC-32C bit by bit, the definition (reflected polynomial 0x82f63b78, pre- and post-inverted), independent of the addon. */
export function refCrc32c(data: Uint8Array, crc = 0): number {
  let c = ~crc >>> 0;
  for (const b of data) {
    c ^= b;
    for (let i = 0; i < 8; i++) c = (c >>> 1) ^ (0x82f63b78 & -(c & 1));
  }
  return ~c >>> 0;
}

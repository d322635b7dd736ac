/**
 * Framing: header + body out, a byte stream (with the fds that came along)
 * in. The decoder judges every frame from its 16-byte header before it
 * buffers any of the body (spec: "Header"; STYLE: "Decide from the header
 * alone"), so a hostile size cannot make it allocate. A command number the
 * decoder does not know is not a framing fault: the size still says where
 * the next frame starts, so such a frame is delivered and the receiver
 * answers it with an errno (as libvfio-user does) instead of hanging up.
 */
import { HEADER_SIZE, HeaderFlags, MessageSize, COMMAND_NAMES } from "./constants.ts";
import { type Header, readHeader, writeHeader } from "./header.ts";
import { U32_MAX } from "./u64.ts";
import { asBuffer, viewOf } from "./wire.ts";

/** One complete message off the wire. */
export interface Frame {
  header: Header;
  /**
   * The bytes after the header. A view into the pushed chunk when the frame
   * sat inside one chunk (valid as long as the chunk is), else its own buffer.
   */
  body: Buffer;
  /** Fds that arrived with the bytes of this frame, in arrival order; the receiver owns them. */
  fds: number[];
}

/** Frames at least this large get a buffer of their own (not Buffer's shared pool), which recycle() can reuse. */
const RECYCLE_MIN = 64 * 1024;

/**
 * A header that cannot start a valid frame. Fatal: the stream has lost its
 * framing, so the connection must be closed.
 */
export class FrameError extends Error {
  /** The offending header, when 16 bytes were available. */
  readonly header: Header | undefined;

  constructor(message: string, header?: Header) {
    super(message);
    this.name = "FrameError";
    this.header = header;
  }
}

/** Largest fixed part in front of bulk data (REGION_READ/WRITE and DMA_READ/WRITE: 16 bytes). */
export const DATA_FIXED_PART_MAX = Math.max(
  MessageSize.REGION_ACCESS_FIXED,
  MessageSize.DMA_ACCESS_FIXED,
  MessageSize.MIG_DATA_FIXED,
  MessageSize.DEVICE_FEATURE_FIXED,
);

/**
 * Room for bodies that carry no bulk data but can still grow: VERSION JSON,
 * SET_IRQS DATA_BOOL arrays (MSI-X has at most 2048 vectors), DMA logging
 * ranges, REGION_WRITE_MULTI (8 + 200 x 24 = 4808 bytes). 64 KiB covers all
 * of them with a wide margin.
 */
export const CONTROL_BODY_MAX = 64 * 1024;

/**
 * The largest legitimate frame when data transfers are capped at
 * `maxDataXferSize`: header + largest fixed part + data, but never less
 * than header + CONTROL_BODY_MAX.
 */
export function maxFrameSizeFor(maxDataXferSize: number): number {
  if (!Number.isInteger(maxDataXferSize) || maxDataXferSize < 0) {
    throw new RangeError(`max_data_xfer_size must be a non-negative integer: ${maxDataXferSize}`);
  }
  return Math.min(U32_MAX, HEADER_SIZE + Math.max(DATA_FIXED_PART_MAX + maxDataXferSize, CONTROL_BODY_MAX));
}

/**
 * Frames a message: returns [header, ...body parts] so large data is sent
 * without concatenation (empty parts are dropped). `size` is computed.
 */
export function encodeMessage(header: Omit<Header, "size">, body: Uint8Array | readonly Uint8Array[] = []): Buffer[] {
  const parts: readonly Uint8Array[] = body instanceof Uint8Array ? [body] : body;
  let size = HEADER_SIZE;
  for (const p of parts) size += p.length;
  if (size > U32_MAX) throw new RangeError(`message of ${size} bytes does not fit the u32 size field`);
  const head = Buffer.allocUnsafe(HEADER_SIZE);
  writeHeader(viewOf(head), 0, { ...header, size });
  const out: Buffer[] = [head];
  for (const p of parts) if (p.length > 0) out.push(asBuffer(p));
  return out;
}

/** A command header (type 0), optionally with No_reply. */
export function commandHeader(msgId: number, command: number, noReply = false): Omit<Header, "size"> {
  return { msgId, command, flags: HeaderFlags.TYPE_COMMAND | (noReply ? HeaderFlags.NO_REPLY : 0), error: 0 };
}

/** The header of a reply to `req`: same msgId and command, Reply type, Error bit when errno != 0. */
export function replyHeader(req: Pick<Header, "msgId" | "command">, errno = 0): Omit<Header, "size"> {
  return {
    msgId: req.msgId,
    command: req.command,
    flags: HeaderFlags.TYPE_REPLY | (errno !== 0 ? HeaderFlags.ERROR : 0),
    error: errno,
  };
}

/** A successful reply to `req` carrying `body`. */
export function encodeReply(req: Pick<Header, "msgId" | "command">, body: Uint8Array | readonly Uint8Array[] = []): Buffer[] {
  return encodeMessage(replyHeader(req), body);
}

/** An error reply: spec: "If an error occurs, the reply message must only include the reply header." */
export function encodeErrorReply(req: Pick<Header, "msgId" | "command">, errno: number): Buffer[] {
  if (!Number.isInteger(errno) || errno <= 0) throw new RangeError(`error reply needs a positive errno, got ${errno}`);
  return encodeMessage(replyHeader(req, errno), []);
}

export interface FrameDecoderOptions {
  /** Called once per complete frame, in stream order. */
  onFrame: (frame: Frame) => void;
  /** Initial size limit; defaults to maxFrameSizeFor(the spec's default max_data_xfer_size). */
  maxFrameSize?: number;
}

const DEFAULT_MAX_FRAME = maxFrameSizeFor(1048576);

/**
 * readHeader() straight off the bytes: the same fields, without building a
 * DataView over every chunk (for a chunk holding one small message, the
 * DataView costs more than the five reads) and without Buffer#readUInt*'s
 * argument checks (the caller knows 16 bytes are there).
 */
function headerAt(b: Uint8Array, p: number): Header {
  return {
    msgId: b[p]! | (b[p + 1]! << 8),
    command: b[p + 2]! | (b[p + 3]! << 8),
    size: (b[p + 4]! | (b[p + 5]! << 8) | (b[p + 6]! << 16)) + b[p + 7]! * 0x1000000,
    flags: (b[p + 8]! | (b[p + 9]! << 8) | (b[p + 10]! << 16)) + b[p + 11]! * 0x1000000,
    error: (b[p + 12]! | (b[p + 13]! << 8) | (b[p + 14]! << 16)) + b[p + 15]! * 0x1000000,
  };
}

/**
 * Splits a byte stream into frames.
 *
 * Fds belong to the frame holding the last byte of the chunk they arrived
 * with; when that chunk ends mid-frame they wait for that frame. Complete
 * frames inside a chunk are delivered as views of it (no copy); a frame
 * split across chunks is assembled once into a buffer of its exact size.
 *
 * If `push` throws (a FrameError for a bad header, or whatever onFrame
 * threw) the decoder is closed for good; fds it did not hand out stay with
 * it and `close()` returns them so the caller can close them.
 */
export class FrameDecoder {
  #onFrame: (frame: Frame) => void;
  #maxFrameSize: number;
  #closed = false;
  /** Bytes of a header split across chunks. */
  readonly #headerBytes = Buffer.alloc(HEADER_SIZE);
  readonly #headerView = viewOf(this.#headerBytes);
  #headerHave = 0;
  /** The frame being assembled once its header is known. */
  #partial: { header: Header; buf: Buffer; have: number } | null = null;
  /** Fds waiting for the incomplete frame (or for the closing caller). */
  #pendingFds: number[] = [];
  /** See `highWater`. */
  #highWater = 0;
  /** Large frame buffers this decoder allocated (only those may come back through recycle()). */
  readonly #own = new WeakSet<ArrayBufferLike>();
  /** A large frame buffer handed back by recycle(), for the next large frame. */
  #spare: Buffer | null = null;

  constructor(options: FrameDecoderOptions) {
    this.#onFrame = options.onFrame;
    this.#maxFrameSize = DEFAULT_MAX_FRAME;
    if (options.maxFrameSize !== undefined) this.maxFrameSize = options.maxFrameSize;
  }

  /** Frames larger than this are refused from their header. Change it after VERSION negotiation. */
  get maxFrameSize(): number {
    return this.#maxFrameSize;
  }

  set maxFrameSize(value: number) {
    if (!Number.isInteger(value) || value < HEADER_SIZE || value > U32_MAX) {
      throw new RangeError(`maxFrameSize must be an integer in [${HEADER_SIZE}, ${U32_MAX}]: ${value}`);
    }
    this.#maxFrameSize = value;
  }

  /** True after close() or after push() threw. */
  get closed(): boolean {
    return this.#closed;
  }

  /** Bytes held for an incomplete frame. */
  get bufferedBytes(): number {
    return this.#partial !== null ? this.#partial.have : this.#headerHave;
  }

  /**
   * Most bytes this decoder ever held at once for an incomplete frame: the
   * bytes of a split header, or, once a header is known, the frame's whole
   * size (its buffer is allocated in one piece then). Frames delivered as
   * views of a pushed chunk cost the decoder nothing. Never more than
   * `maxFrameSize` at the time: a header is judged before its buffer exists.
   * Survives close() (the server's accounting of what a client made it hold).
   */
  get highWater(): number {
    return this.#highWater;
  }

  #hold(bytes: number): void {
    if (bytes > this.#highWater) this.#highWater = bytes;
  }

  /** The header of the frame being assembled, once its 16 bytes arrived (diagnostics: a frame left incomplete). */
  get pendingHeader(): Header | undefined {
    return this.#partial?.header;
  }

  /** Closes the decoder and hands back the fds it still holds (the caller must close them). */
  close(): number[] {
    this.#closed = true;
    this.#partial = null;
    this.#headerHave = 0;
    const fds = this.#pendingFds;
    this.#pendingFds = [];
    return fds;
  }

  #check(header: Header): void {
    if (header.size < HEADER_SIZE) {
      throw new FrameError(`message size ${header.size} is smaller than the ${HEADER_SIZE}-byte header`, header);
    }
    if (header.size > this.#maxFrameSize) {
      throw new FrameError(`message size ${header.size} exceeds the limit of ${this.#maxFrameSize}`, header);
    }
    const type = header.flags & HeaderFlags.TYPE_MASK;
    if (type !== HeaderFlags.TYPE_COMMAND && type !== HeaderFlags.TYPE_REPLY) {
      throw new FrameError(`message type ${type} of ${COMMAND_NAMES[header.command] ?? `command ${header.command}`} is neither command nor reply`, header);
    }
  }

  /**
   * For a transport that can read straight into the frame being assembled:
   * the unfilled rest of that frame's buffer (it ends where the frame ends,
   * so a read into it cannot take the next frame's bytes), or null when no
   * frame is half-assembled or fewer than `min` of its bytes are missing.
   * Bytes read into it are reported with filled(); they then cost no copy
   * of their own (a large MIG_DATA_WRITE or REGION_WRITE is read from the
   * socket into its frame directly).
   */
  readTarget(min = 1): Buffer | null {
    const p = this.#partial;
    if (p === null || this.#closed) return null;
    if (p.header.size - p.have < min) return null;
    return p.buf.subarray(p.have);
  }

  /** `n` bytes (and `fds`, which came with them) were read into readTarget()'s buffer: as push() of those bytes. */
  filled(n: number, fds: readonly number[] = []): void {
    const p = this.#partial;
    if (this.#closed || p === null || !Number.isInteger(n) || n <= 0 || p.have + n > p.header.size) {
      this.#pendingFds.push(...fds);
      this.#closed = true;
      this.#partial = null;
      throw new FrameError(`filled(${n}) does not fit the frame being assembled`);
    }
    p.have += n;
    if (p.have < p.header.size) {
      this.#pendingFds.push(...fds);
      return;
    }
    const frameFds = this.#pendingFds;
    this.#pendingFds = [];
    frameFds.push(...fds);
    this.#partial = null;
    this.#onFrame({ header: p.header, body: p.buf.subarray(HEADER_SIZE), fds: frameFds });
  }

  /**
   * The caller is done with a frame this decoder assembled (nothing refers
   * to its body any more): its buffer, if it was a large one of this
   * decoder's, takes the next large frame instead of a fresh allocation.
   * A stream of 1 MiB MIG_DATA_WRITEs then reuses one buffer instead of
   * allocating (and garbage-collecting) one per frame. Anything else is ignored.
   */
  recycle(body: Uint8Array): void {
    const ab = body.buffer;
    if (!this.#own.has(ab) || this.#partial?.buf.buffer === ab) return;
    if (this.#spare !== null && this.#spare.length >= ab.byteLength) return;
    this.#spare = Buffer.from(ab as ArrayBuffer);
  }

  /** A buffer for a frame of `size` bytes: the spare when it fits, else fresh (large ones become recyclable). */
  #frameBuffer(size: number): Buffer {
    if (size < RECYCLE_MIN) return Buffer.allocUnsafe(size);
    const spare = this.#spare;
    if (spare !== null && spare.length >= size) {
      this.#spare = null;
      return spare.subarray(0, size);
    }
    const b = Buffer.allocUnsafeSlow(size);
    this.#own.add(b.buffer);
    return b;
  }

  /** Feeds the next chunk of the stream and the fds that came with it. */
  push(chunk: Uint8Array, fds: readonly number[] = []): void {
    let fdsTaken = false;
    try {
      if (this.#closed) throw new FrameError("frame decoder is closed");
      const buf = asBuffer(chunk);
      const len = buf.length;
      let pos = 0;

      // 1. Finish a frame begun in an earlier chunk.
      if (this.#headerHave > 0 || this.#partial !== null) {
        if (this.#partial === null) {
          const take = Math.min(HEADER_SIZE - this.#headerHave, len);
          buf.copy(this.#headerBytes, this.#headerHave, 0, take);
          this.#headerHave += take;
          this.#hold(this.#headerHave);
          pos = take;
          if (this.#headerHave < HEADER_SIZE) {
            this.#pendingFds.push(...fds);
            fdsTaken = true;
            return;
          }
          const header = readHeader(this.#headerView, 0);
          this.#check(header);
          const assembled = this.#frameBuffer(header.size);
          this.#hold(header.size);
          this.#headerBytes.copy(assembled, 0);
          this.#partial = { header, buf: assembled, have: HEADER_SIZE };
          this.#headerHave = 0;
        }
        const p = this.#partial;
        const take = Math.min(p.header.size - p.have, len - pos);
        buf.copy(p.buf, p.have, pos, pos + take);
        p.have += take;
        pos += take;
        if (p.have < p.header.size) {
          this.#pendingFds.push(...fds);
          fdsTaken = true;
          return;
        }
        const frameFds = this.#pendingFds;
        this.#pendingFds = [];
        if (pos === len) {
          frameFds.push(...fds);
          fdsTaken = true;
        }
        this.#partial = null;
        this.#onFrame({ header: p.header, body: p.buf.subarray(HEADER_SIZE), fds: frameFds });
      }

      // 2. Frames wholly inside this chunk: views, no copies.
      while (len - pos >= HEADER_SIZE) {
        const header = headerAt(buf, pos);
        this.#check(header);
        const end = pos + header.size;
        if (end > len) break;
        let frameFds: number[];
        if (end === len && !fdsTaken) {
          frameFds = fds.length > 0 ? [...fds] : [];
          fdsTaken = true;
        } else {
          frameFds = [];
        }
        const body = buf.subarray(pos + HEADER_SIZE, end);
        pos = end;
        this.#onFrame({ header, body, fds: frameFds });
      }

      // 3. Keep the start of the next frame.
      if (pos < len) {
        const rest = len - pos;
        if (rest < HEADER_SIZE) {
          buf.copy(this.#headerBytes, 0, pos, len);
          this.#headerHave = rest;
          this.#hold(rest);
        } else {
          // The loop above already checked this header and stopped for lack of body.
          const header = headerAt(buf, pos);
          const assembled = this.#frameBuffer(header.size);
          this.#hold(header.size);
          buf.copy(assembled, 0, pos, len);
          this.#partial = { header, buf: assembled, have: rest };
        }
      }
      if (!fdsTaken) {
        // The chunk ended mid-frame (or was empty): the fds wait for that frame.
        this.#pendingFds.push(...fds);
        fdsTaken = true;
      }
    } catch (err) {
      if (!fdsTaken) this.#pendingFds.push(...fds);
      this.#closed = true;
      this.#partial = null;
      this.#headerHave = 0;
      throw err;
    }
  }
}

/**
 * The byte stream under a vfio-user connection. The UNIX-socket transport is
 * the only code that touches sockets and fds on the wire; component tests use
 * an in-memory pair with the same shape.
 */
export interface TransportHandlers {
  /**
   * Bytes read from the peer, in order, with the fds that arrived with them.
   * The chunk is owned by the receiver. Fds belong to the message that holds
   * the last byte of the chunk (the kernel ends a read after the piece that
   * carried them).
   */
  data(chunk: Buffer, fds: number[]): void;
  /**
   * Optional, with `filled`: a buffer the transport may read the next bytes
   * into directly (the rest of a frame being assembled), or null. A read
   * into it never takes more than its length.
   */
  readTarget?(): Uint8Array | null;
  /** `n` bytes and `fds` were read into the buffer readTarget() returned (as `data` of those bytes). */
  filled?(n: number, fds: number[]): void;
  /** The peer went away or the transport failed; called once. */
  close(err?: Error): void;
  /** `congested` went back to false: the peer has read enough of what was queued. */
  drain?(): void;
}

export interface Transport {
  /** Start delivering data; handlers are called until close. */
  start(handlers: TransportHandlers): void;
  /**
   * Send bytes (several buffers form one message, sent as one sendmsg where
   * possible) with fds attached to the first byte. Never throws for a full
   * socket: the rest is queued and flushed when writable. Neither the
   * buffers nor the array are retained (what is queued is a copy): the
   * caller may reuse them as soon as send returns; the server's connection
   * assembles every small reply in one reused buffer.
   */
  send(buffers: readonly Uint8Array[], fds?: readonly number[]): void;
  /** Close the connection; `close` handler fires once. Queued bytes are dropped. */
  close(): void;
  readonly closed: boolean;
  /**
   * True while more is queued for the peer than it has read (above a
   * high-water mark); the transport then stops reading, and a server stops
   * producing replies, until `drain`.
   */
  readonly congested: boolean;
  /**
   * Bytes handed to send() that have not reached the peer yet (held by this
   * transport). Both transports here keep it; a transport without a queue
   * of its own may leave it out (counted as 0).
   */
  readonly queuedBytes?: number;
  /**
   * Most bytes ever queued at once (`queuedBytes`'s high-water mark, kept
   * after close): the transport's own accounting of what a peer that does
   * not read made it hold.
   */
  readonly queuedHighWater?: number;
  /** A short peer description for logs. */
  readonly peer: string;
}

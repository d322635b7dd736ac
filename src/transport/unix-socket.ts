/**
 * The UNIX-socket transport: a listening socket (UnixServer) and a
 * connection (UnixConnection, a Transport) on top of the vfio_native addon,
 * which does recvmsg/sendmsg with SCM_RIGHTS and watches the fds with
 * uv_poll on Node's own event loop.
 *
 * Choices worth knowing:
 * - Reads go into one scratch buffer (256 KiB) shared by all connections;
 *   reads are synchronous and never nest, and every chunk handed to the
 *   receiver is a fresh copy that it owns. A wake-up reads until EAGAIN, or
 *   until a short read that carried no fds (the socket was drained; the poll
 *   is level-triggered, so bytes that arrive later wake us again), at most
 *   64 reads, so one busy peer cannot starve the loop.
 * - send() tries sendmsg at once. What the socket does not take is copied
 *   into a queue (the caller may reuse its buffers as soon as send returns),
 *   and the queued message's fds are dup'ed if they have not gone out yet
 *   (the caller may close its fds as soon as send returns). Fds always leave
 *   with the first byte of their message, in a sendmsg that holds nothing
 *   but (the start of) that message; queued messages without fds are
 *   coalesced into one sendmsg.
 * - Errors never throw out of send(): a failed recvmsg/sendmsg closes the
 *   connection and the close handler receives the error.
 * - The close handler fires exactly once, on process.nextTick after the
 *   close, so it never re-enters the caller of close()/send() synchronously.
 *   Data already read is delivered before it; nothing is delivered after.
 */
import fs from "node:fs";
import path from "node:path";
import { constants as osConstants } from "node:os";
import { errnoError, native, type NativeWatcher } from "./native.ts";
import type { Transport, TransportHandlers } from "./types.ts";

const { EAGAIN, EADDRINUSE, ECONNREFUSED, ENOENT } = osConstants.errno;
const { READABLE, WRITABLE, MAX_FDS } = native;

/** Size of the shared read buffer; one read delivers at most this much. */
export const READ_CHUNK_SIZE = 256 * 1024;
const MAX_READS_PER_WAKEUP = 64;
/**
 * Back-pressure: while more than HIGH_WATER bytes wait to be sent (the peer
 * is not reading its replies), the connection stops reading requests; it
 * reads again once the queue is below LOW_WATER. What a client can make the
 * server hold is bounded by this, not by how much it sends.
 */
export const SEND_HIGH_WATER = 4 * 1024 * 1024;
export const SEND_LOW_WATER = 1024 * 1024;
const MAX_IOV = 64;

let scratch: Buffer | null = null;
const fdsOut = new Int32Array(1 + MAX_FDS);

interface QueuedSend {
  data: Buffer;
  /** Fds not sent yet (our own dups), or null. */
  fds: Int32Array | null;
}

export class UnixConnection implements Transport {
  /** The socket's fd (owned by the connection; closed by close()). */
  readonly fd: number;
  readonly peer: string;
  private readonly watcher: NativeWatcher;
  private handlers: TransportHandlers | null = null;
  private started = false;
  private _closed = false;
  /** Set when closed before start(): reported once start() is called. */
  private closeReason: { err: Error | undefined } | null = null;
  private queue: QueuedSend[] = [];
  /** Bytes in `queue`. */
  private queued = 0;
  private queuedMax = 0;
  /** Reading stopped for back-pressure. */
  private readPaused = false;
  private pollMask = 0;

  /** Connects to a listening socket (blocking connect; local, so immediate). */
  static connect(socketPath: string): UnixConnection {
    const fd = native.connect(socketPath);
    if (fd < 0) throw errnoError(fd, "connect", socketPath);
    return new UnixConnection(fd);
  }

  /** Takes ownership of a connected, non-blocking AF_UNIX stream socket. */
  constructor(fd: number) {
    this.fd = fd;
    this.peer = `unix:fd=${fd}`;
    this.watcher = new native.Watcher(fd, (events, status) => this.onPoll(events, status));
  }

  get closed(): boolean {
    return this._closed;
  }

  get congested(): boolean {
    return this.readPaused;
  }

  /** Bytes waiting in the send queue (the socket did not take them yet). */
  get queuedBytes(): number {
    return this.queued;
  }

  /**
   * Most bytes the send queue ever held. Back-pressure keeps it at most
   * SEND_HIGH_WATER plus the message that crossed it, plus whatever is sent
   * while congested without reading more (a server's own requests).
   */
  get queuedHighWater(): number {
    return this.queuedMax;
  }

  start(handlers: TransportHandlers): void {
    if (this.started) throw new Error("UnixConnection.start() called twice");
    this.started = true;
    this.handlers = handlers;
    if (this._closed) {
      const reason = this.closeReason;
      this.handlers = null;
      if (reason) process.nextTick(() => handlers.close(reason.err));
      return;
    }
    this.updatePoll();
  }

  send(buffers: readonly Uint8Array[], fds?: readonly number[]): void {
    if (this._closed) return;
    const nfds = fds?.length ?? 0;
    let total = 0;
    for (let i = 0; i < buffers.length; i++) total += buffers[i]!.byteLength;
    if (nfds > 0) {
      if (nfds > MAX_FDS) throw new RangeError(`at most ${MAX_FDS} fds per message (got ${nfds})`);
      if (total === 0) throw new RangeError("fds need a message of at least one byte");
    }
    if (total === 0) return;
    const fdArray = nfds > 0 ? Int32Array.from(fds!) : null;

    let sent = 0;
    if (this.queue.length === 0) {
      const n = native.send(this.fd, buffers, fdArray);
      if (n < 0 && n !== -EAGAIN) {
        this.shutdown(errnoError(n, "sendmsg"));
        return;
      }
      if (n === total) return;
      if (n > 0) sent = n;
    }
    // Queue the rest: a private copy, and dups of fds that did not go out.
    const rest = Buffer.allocUnsafe(total - sent);
    let at = 0;
    let skip = sent;
    for (let i = 0; i < buffers.length; i++) {
      const b = buffers[i]!;
      if (skip >= b.byteLength) {
        skip -= b.byteLength;
        continue;
      }
      rest.set(skip === 0 ? b : b.subarray(skip), at);
      at += b.byteLength - skip;
      skip = 0;
    }
    let queuedFds: Int32Array | null = null;
    if (fdArray !== null && sent === 0) {
      queuedFds = new Int32Array(fdArray.length);
      for (let i = 0; i < fdArray.length; i++) {
        const d = native.dup(fdArray[i]!);
        if (d < 0) {
          for (let j = 0; j < i; j++) native.close(queuedFds[j]!);
          this.shutdown(errnoError(d, "dup"));
          return;
        }
        queuedFds[i] = d;
      }
    }
    this.queue.push({ data: rest, fds: queuedFds });
    this.queued += rest.length;
    if (this.queued > this.queuedMax) this.queuedMax = this.queued;
    if (this.queued > SEND_HIGH_WATER) this.readPaused = true;
    this.updatePoll();
  }

  close(): void {
    this.shutdown(undefined);
  }

  private shutdown(err: Error | undefined): void {
    if (this._closed) return;
    this._closed = true;
    this.watcher.close(); // before closing the fd: the poll must not see it reused
    native.close(this.fd);
    for (const q of this.queue) if (q.fds) for (const fd of q.fds) native.close(fd);
    this.queue = [];
    this.queued = 0;
    const handlers = this.handlers;
    this.handlers = null;
    if (handlers) process.nextTick(() => handlers.close(err));
    else if (!this.started) this.closeReason = { err };
  }

  private updatePoll(): void {
    if (this._closed) return;
    const mask = (this.started && !this.readPaused ? READABLE : 0) | (this.queue.length > 0 ? WRITABLE : 0);
    if (mask === this.pollMask) return;
    this.pollMask = mask;
    const r = this.watcher.start(mask);
    if (r < 0) this.shutdown(errnoError(r, "uv_poll_start"));
  }

  private onPoll(events: number, status: number): void {
    if (this._closed) return;
    if (status < 0) {
      this.shutdown(errnoError(status, "poll"));
      return;
    }
    if ((events & WRITABLE) !== 0) this.flush();
    if ((events & READABLE) !== 0) this.readAll();
  }

  private readAll(): void {
    const buf = (scratch ??= Buffer.allocUnsafeSlow(READ_CHUNK_SIZE));
    for (let i = 0; i < MAX_READS_PER_WAKEUP; i++) {
      if (this._closed || this.handlers === null || this.readPaused) return;
      // the rest of a large frame goes straight into that frame's buffer (no copy here)
      const target = this.handlers.filled !== undefined ? (this.handlers.readTarget?.() ?? null) : null;
      const into = target ?? buf;
      const n = native.recv(this.fd, into, fdsOut);
      if (n < 0) {
        if (n !== -EAGAIN) this.shutdown(errnoError(n, "recvmsg"));
        return;
      }
      const nfds = fdsOut[0]!;
      if (nfds < 0) {
        const e: NodeJS.ErrnoException = new Error(
          "file descriptors sent by the peer were lost (control data truncated); closing",
        );
        e.code = "ECTRUNC";
        this.shutdown(e);
        return;
      }
      if (n === 0) {
        this.shutdown(undefined);
        return;
      }
      const fds: number[] = [];
      for (let k = 1; k <= nfds; k++) fds.push(fdsOut[k]!);
      if (target !== null) {
        this.handlers.filled!(n, fds);
      } else {
        const chunk = Buffer.allocUnsafe(n);
        buf.copy(chunk, 0, 0, n);
        this.handlers.data(chunk, fds);
      }
      if (n < into.length && nfds === 0) return; // drained
    }
  }

  private flush(): void {
    const q = this.queue;
    const bufs: Buffer[] = [];
    while (q.length > 0 && !this._closed) {
      const first = q[0]!;
      bufs.length = 0;
      bufs.push(first.data);
      let total = first.data.length;
      // A message with fds goes out alone: the receiver's read ends after
      // the piece that carried them, and that must end inside this message.
      // Messages without fds are coalesced.
      const alone = first.fds !== null;
      for (let k = 1; !alone && k < q.length && k < MAX_IOV && q[k]!.fds === null; k++) {
        bufs.push(q[k]!.data);
        total += q[k]!.data.length;
      }
      let n = native.send(this.fd, bufs, first.fds);
      if (n < 0) {
        if (n !== -EAGAIN) this.shutdown(errnoError(n, "sendmsg"));
        return;
      }
      if (first.fds !== null) {
        for (const fd of first.fds) native.close(fd); // the peer has its copies now
        first.fds = null;
      }
      const partial = n < total;
      while (n > 0) {
        const head = q[0]!;
        if (n >= head.data.length) {
          n -= head.data.length;
          this.queued -= head.data.length;
          q.shift();
        } else {
          head.data = head.data.subarray(n);
          this.queued -= n;
          n = 0;
        }
      }
      if (this.readPaused && this.queued < SEND_LOW_WATER) {
        this.readPaused = false;
        this.updatePoll();
        this.handlers?.drain?.();
      }
      if (partial) return; // socket full: wait for the next writable
    }
    this.updatePoll();
  }
}

export interface UnixServerOptions {
  /** Permission bits of the socket file (default 0o600), set before listen(). */
  mode?: number;
  backlog?: number;
  onConnection: (connection: UnixConnection) => void;
  /**
   * accept() failed with something other than EAGAIN (EMFILE, ENOBUFS...).
   * Accepting pauses for 100 ms so a pending connection cannot spin the loop.
   */
  onError?: (err: Error) => void;
}

export class UnixServer {
  readonly path: string;
  private readonly fd: number;
  private readonly watcher: NativeWatcher;
  private readonly ident: { dev: number; ino: number } | null;
  private readonly opts: UnixServerOptions;
  private _closed = false;
  private pauseTimer: NodeJS.Timeout | null = null;

  /**
   * Listens on `socketPath`. A stale socket file (nobody accepts: connect
   * gets ECONNREFUSED) is replaced; a live server or a non-socket file at
   * the path throws with code EADDRINUSE; a missing directory throws ENOENT.
   */
  static listen(socketPath: string, opts: UnixServerOptions): UnixServer {
    const mode = opts.mode ?? 0o600;
    const backlog = opts.backlog ?? 16;
    let fd = native.listen(socketPath, backlog, mode);
    if (fd === -EADDRINUSE) {
      checkStale(socketPath);
      fd = native.listen(socketPath, backlog, mode);
    }
    if (fd < 0) {
      if (fd === -ENOENT) {
        const e = errnoError(fd, "bind", socketPath);
        e.message = `cannot listen on ${socketPath}: directory ${path.dirname(socketPath)} does not exist`;
        throw e;
      }
      const e = errnoError(fd, "listen", socketPath);
      e.message = `cannot listen on ${socketPath}: ${e.code}`;
      throw e;
    }
    return new UnixServer(socketPath, fd, opts);
  }

  private constructor(socketPath: string, fd: number, opts: UnixServerOptions) {
    this.path = socketPath;
    this.fd = fd;
    this.opts = opts;
    let ident: { dev: number; ino: number } | null = null;
    try {
      const st = fs.statSync(socketPath);
      ident = { dev: st.dev, ino: st.ino };
    } catch {
      // Removed under us already: close() will not unlink anything.
    }
    this.ident = ident;
    this.watcher = new native.Watcher(fd, (_events, status) => this.onReadable(status));
    this.watcher.start(READABLE);
  }

  get closed(): boolean {
    return this._closed;
  }

  /** Stops accepting and removes the socket file if it is still ours. Open connections stay. */
  close(): void {
    if (this._closed) return;
    this._closed = true;
    if (this.pauseTimer) clearTimeout(this.pauseTimer);
    this.watcher.close();
    native.close(this.fd);
    if (this.ident) {
      try {
        const st = fs.lstatSync(this.path);
        if (st.dev === this.ident.dev && st.ino === this.ident.ino) fs.unlinkSync(this.path);
      } catch {
        // already gone
      }
    }
  }

  /** Let the process exit while the server is listening (like net.Server#unref). */
  unref(): this {
    this.watcher.unref();
    return this;
  }

  ref(): this {
    this.watcher.ref();
    return this;
  }

  private onReadable(status: number): void {
    if (this._closed) return;
    if (status < 0) {
      this.pause(errnoError(status, "poll"));
      return;
    }
    for (;;) {
      const cfd = native.accept(this.fd);
      if (cfd < 0) {
        if (cfd !== -EAGAIN) this.pause(errnoError(cfd, "accept"));
        return;
      }
      this.opts.onConnection(new UnixConnection(cfd));
      if (this._closed) return;
    }
  }

  private pause(err: Error): void {
    this.watcher.stop();
    this.pauseTimer = setTimeout(() => {
      this.pauseTimer = null;
      if (!this._closed) this.watcher.start(READABLE);
    }, 100);
    this.opts.onError?.(err);
  }
}

/**
 * Called when bind() found something at the path. Removes a stale socket;
 * throws EADDRINUSE for a live server or a file that is not a socket.
 */
function checkStale(socketPath: string): void {
  let st: fs.Stats;
  try {
    st = fs.lstatSync(socketPath);
  } catch {
    return; // vanished meanwhile: just retry
  }
  const inUse = (why: string): Error => {
    const e = errnoError(-EADDRINUSE, "listen", socketPath);
    e.message = `cannot listen on ${socketPath}: ${why}`;
    return e;
  };
  if (!st.isSocket()) throw inUse("the path exists and is not a socket (not removing it)");
  const probe = native.connect(socketPath, true);
  if (probe >= 0) {
    native.close(probe);
    throw inUse("another server is listening on it");
  }
  if (probe === -EAGAIN) throw inUse("another server is listening on it (backlog full)");
  if (probe !== -ECONNREFUSED) throw errnoError(probe, "connect", socketPath);
  fs.unlinkSync(socketPath); // stale: nobody accepts on it
}

/**
 * One client connection: frames in, commands dispatched in order through
 * the handler table, replies framed here and nowhere else, and the
 * server-to-client requests (DMA_READ / DMA_WRITE) matched with their
 * replies. A bad header closes the connection; a bad body gets an errno.
 */
import type { Logger } from "pino";
import { COMMAND_NAMES, Command, Errno, HEADER_SIZE, HeaderFlags, isKnownCommand } from "../../protocol/constants.ts";
import { VfioUserError, errnoOf, fail } from "../../protocol/errors.ts";
import { FrameDecoder, FrameError, maxFrameSizeFor, type Frame } from "../../protocol/frame.ts";
import { PendingRequests } from "../../protocol/pending-requests.ts";
import { writeHeader, type Header } from "../../protocol/header.ts";
import { viewOf } from "../../protocol/wire.ts";
import {
  decodeDmaReadReply,
  encodeDmaReadRequest,
} from "../../protocol/messages/dma-read.ts";
import { decodeDmaWriteReply, encodeDmaWriteRequestParts } from "../../protocol/messages/dma-write.ts";
import type { ClientConformance } from "../conformance/recorder.ts";
import { ConnectionDrop, type FaultSet } from "../faults/fault-set.ts";
import type { SocketDma } from "../dma/dma-engine.ts";
import type { Transport } from "../transport/types.ts";
import type { HandlerTable, Reply, Request } from "./dispatcher.ts";
import type { Endpoint } from "./endpoint.ts";
import { commandAllowed, fdsAllowed } from "./command-rules.ts";
import { LogLimiter } from "./log-limiter.ts";
import type { Session } from "./session.ts";
import { traceFields } from "./trace.ts";

/**
 * Replies up to this size are assembled in one reusable buffer and sent as a
 * single iovec: no allocation, and the addon never touches small on-heap
 * Buffers (which V8 would have to move off-heap first). Larger replies go
 * out as [header, ...parts] without copying the parts.
 */
const REPLY_COPY_MAX = 4096;
/**
 * A frame still missing at least this many bytes is read from the socket
 * straight into its buffer (FrameDecoder.readTarget) instead of through the
 * transport's read chunk and a copy: bulk MIG_DATA_WRITE and REGION_WRITE
 * bodies. Below it the ordinary path reads whatever else is waiting too.
 */
const DIRECT_READ_MIN = 16 * 1024;

/** The spec's name of a command, or its number when it has none. */
function cmdName(command: number): string | number {
  return COMMAND_NAMES[command] ?? command;
}

export interface ConnectionOptions {
  transport: Transport;
  endpoint: Endpoint;
  handlers: HandlerTable;
  session: Session;
  log: Logger;
  closeFd(fd: number): void;
  /** How long a server-to-client request may wait for its reply. */
  requestTimeoutMs?: number;
  /** Log every message decoded (the CLI's --trace). */
  trace?: boolean;
  onClose?(): void;
}

export class Connection implements SocketDma {
  private readonly decoder: FrameDecoder;
  private readonly queue: Frame[] = [];
  private busy = false;
  private closed = false;
  /** A handler asked for the connection to end after its reply (closeAfterReply). */
  private closeAfterReply = false;
  private readonly closeAfterReplyFn = (): void => {
    this.closeAfterReply = true;
  };
  /** This server's DMA_READ / DMA_WRITE requests awaiting the client's reply. */
  private readonly pending: PendingRequests;
  private readonly log: Logger;
  private readonly trace: boolean;
  /** A client can provoke refusals at will: their log lines are rate limited. */
  private readonly limiter = new LogLimiter();
  private readonly logLimitedFn = this.logLimited.bind(this);
  /** Small replies are assembled here (the transport copies what it cannot send at once). */
  private readonly replyBuf = Buffer.allocUnsafeSlow(REPLY_COPY_MAX);
  /** replyViews[n]: replyBuf[0, n), made once per size. */
  private readonly replyViews: Buffer[] = [];
  private readonly sendList: Buffer[] = [this.replyBuf];
  private readonly replyView = viewOf(this.replyBuf);
  /** The client conformance report of this connection, when the server keeps one. */
  private readonly conformance: ClientConformance | null;
  /** Faults injected on demand (serve --fault), or null. */
  private readonly faults: FaultSet | null;

  constructor(private readonly opts: ConnectionOptions) {
    this.log = opts.log;
    this.conformance = opts.session.conformance;
    this.faults = opts.endpoint.faults;
    this.trace = opts.trace ?? false;
    this.pending = new PendingRequests(opts.requestTimeoutMs ?? 5000, (command) => fail.io(`${COMMAND_NAMES[command]} to the client timed out`));
    this.decoder = new FrameDecoder({
      maxFrameSize: maxFrameSizeFor(opts.session.limits.maxDataXferSize),
      onFrame: (frame) => this.onFrame(frame),
    });
  }

  get session(): Session {
    return this.opts.session;
  }

  /** Most bytes the frame decoder held at once for an incomplete frame (FrameDecoder.highWater). */
  get decoderHighWater(): number {
    return this.decoder.highWater;
  }

  /** Most bytes the transport ever had queued unsent to this client (Transport.queuedHighWater). */
  get sendQueueHighWater(): number {
    return this.opts.transport.queuedHighWater ?? 0;
  }

  start(): void {
    this.opts.endpoint.attachClient(this, this.logLimitedFn);
    this.opts.transport.start({
      data: (chunk, fds) => this.onData(chunk, fds),
      readTarget: () => (this.closed ? null : this.decoder.readTarget(DIRECT_READ_MIN)),
      filled: (n, fds) => this.onData(null, fds, n),
      close: (err) => this.onTransportClose(err),
      drain: () => this.pump(),
    });
  }

  close(): void {
    this.opts.transport.close();
  }

  // ---- inbound ----

  /** A chunk read from the socket, or (chunk null) `filled` bytes read straight into the decoder's frame. */
  private onData(chunk: Buffer | null, fds: number[], filled = 0): void {
    if (this.closed) {
      for (const fd of fds) this.opts.closeFd(fd);
      return;
    }
    try {
      if (chunk !== null) this.decoder.push(chunk, fds);
      else this.decoder.filled(filled, fds);
      if (this.conformance !== null) this.conformance.buffered(this.decoder.bufferedBytes, this.decoder.pendingHeader);
    } catch (err) {
      // spec-level framing fault: this connection cannot be trusted to resynchronise
      const h = err instanceof FrameError ? err.header : undefined;
      this.conformance?.badFrame(h, (err as Error).message, h !== undefined && !isKnownCommand(h.command));
      this.log.error(
        { err: (err as Error).message, msgId: h?.msgId, cmd: h ? cmdName(h.command) : undefined, size: h?.size },
        "bad frame; closing the connection",
      );
      // the failing chunk's fds and any that came with the unfinished frame stay with the decoder
      for (const fd of this.decoder.close()) this.opts.closeFd(fd);
      this.opts.transport.close();
    }
  }

  private onFrame(frame: Frame): void {
    const h = frame.header;
    if ((h.flags & HeaderFlags.TYPE_MASK) === HeaderFlags.TYPE_REPLY) {
      this.onReply(frame);
      return;
    }
    if (this.trace) this.log.info({ msgId: h.msgId, cmd: cmdName(h.command), size: h.size, fds: frame.fds.length, ...traceFields(h.command, frame.body) }, "recv");
    if (!this.busy && this.queue.length === 0 && !this.closed && !this.opts.transport.congested) {
      // the common case: nothing waiting, so run it now (what pump() would do, minus the queue)
      this.run(frame);
      return;
    }
    this.queue.push(frame);
    if (!this.busy) this.pump();
  }

  /** Dispatches one frame; an async handler holds the queue until it is done. Returns false if it went async. */
  private run(frame: Frame): boolean {
    let result: Reply | Promise<Reply>;
    try {
      if (this.conformance !== null) this.conformance.observe(frame.header, frame.body);
      result = this.faults === null ? this.dispatch(frame) : this.dispatchWithFaults(this.faults, frame);
    } catch (err) {
      this.finish(frame, null, err);
      return true;
    }
    if (result instanceof Promise) {
      this.busy = true;
      result.then(
        (r) => this.finish(frame, r, null),
        (err) => this.finish(frame, null, err),
      ).catch((err: unknown) => {
        // finish() answers what it cannot send with EIO; this is the last line
        this.log.error({ err, msgId: frame.header.msgId, cmd: cmdName(frame.header.command) }, "reply failed; closing the connection");
        this.opts.transport.close();
      }).finally(() => {
        this.busy = false;
        this.pump();
      });
      return false;
    }
    this.finish(frame, result, null);
    return true;
  }

  /** Commands run strictly in arrival order; an async handler holds the queue until it is done. */
  private pump(): void {
    // a client that does not read its replies gets no more until it does (back-pressure)
    while (!this.busy && this.queue.length > 0 && !this.closed && !this.opts.transport.congested) {
      if (!this.run(this.queue.shift()!)) return;
    }
  }

  private dispatch(frame: Frame): Reply | Promise<Reply> {
    const { header } = frame;
    const session = this.opts.session;
    const verdict = commandAllowed(header.command, session.versionDone, this.opts.endpoint.migrationState);
    if (verdict !== null) throw verdict;
    if (frame.fds.length > session.limits.maxMsgFds) {
      throw fail.inval(`${frame.fds.length} fds in one message; at most ${session.limits.maxMsgFds}`);
    }
    // fds on a command that takes none are refused, not silently closed
    const fdVerdict = fdsAllowed(header.command, frame.fds.length);
    if (fdVerdict !== null) throw fdVerdict;
    const handler = this.opts.handlers.get(header.command);
    // a command this server does not know (a newer client probing, or garbage
    // with a sane size): refused, the session goes on (libvfio-user answers
    // EINVAL; ENOSYS tells "no such command" from "bad arguments")
    if (!handler) throw fail.nosys(`command ${COMMAND_NAMES[header.command] ?? header.command} is not implemented`).with({ rule: "unknown-command" });
    const req: Request = {
      header,
      body: frame.body,
      fds: frame.fds,
      session,
      endpoint: this.opts.endpoint,
      log: this.log,
      socketDma: this,
      logLimited: this.logLimitedFn,
      closeAfterReply: this.closeAfterReplyFn,
    };
    return handler(req);
  }

  /** A command under injected faults: refused, held, or the connection dropped instead of its reply. */
  private dispatchWithFaults(faults: FaultSet, frame: Frame): Reply | Promise<Reply> {
    const step = faults.command<Reply>(frame.header, frame.body);
    return step === null ? this.dispatch(frame) : step(() => this.dispatch(frame));
  }

  private finish(frame: Frame, result: Reply | null, err: unknown): void {
    this.reply(frame, result, err);
    // MIG_DATA_WRITE keeps nothing of its body (the stream reader copies the
    // records it buffers, MEMORY goes into device memory): its frame buffer
    // takes the next large frame
    if (frame.header.command === Command.MIG_DATA_WRITE) this.decoder.recycle(frame.body);
    if (this.closeAfterReply && !this.closed) {
      this.log.info({ msgId: frame.header.msgId, cmd: cmdName(frame.header.command) }, "closing the connection after the reply");
      this.opts.transport.close();
    }
  }

  private reply(frame: Frame, result: Reply | null, err: unknown): void {
    // fds the handler did not take are ours to close
    if (frame.fds.length > 0) {
      for (const fd of frame.fds) this.opts.closeFd(fd);
      frame.fds.length = 0;
    }
    if (err instanceof ConnectionDrop) {
      this.opts.transport.close();
      return;
    }
    const h = frame.header;
    const noReply = (h.flags & HeaderFlags.NO_REPLY) !== 0;
    if (err !== null) {
      if (this.conformance !== null) this.conformance.refused(h, err);
      const errno = errnoOf(err);
      if (!(err instanceof VfioUserError)) {
        this.logLimited("error", { err, msgId: h.msgId, cmd: cmdName(h.command) }, "handler failed unexpectedly");
      } else {
        // a client getting a request wrong must be visible at the default
        // level; rate limited per command, so a flood of one bad command
        // neither fills the log nor hides another command's refusal
        // (one bucket for all unknown commands: a client cannot make 65,536 of them)
        const cmd = cmdName(h.command);
        this.logLimited("info", { msgId: h.msgId, cmd, errno, reason: err.message }, "request refused", `request refused ${typeof cmd === "string" ? cmd : "unknown"}`);
      }
      if (!noReply) this.sendError(h, errno);
      return;
    }
    if (noReply || this.closed) return;
    const fds = result!.fds;
    // spec: max_msg_fds is the most fds the client can receive in one message
    const maxFds = this.opts.session.clientMaxMsgFds;
    if (fds !== undefined && fds.length > maxFds) {
      this.replyFailed(h, `${fds.length} fds in the reply; the client takes at most ${maxFds} (max_msg_fds)`);
      return;
    }
    try {
      this.send({ msgId: h.msgId, command: h.command, size: 0, flags: HeaderFlags.TYPE_REPLY, error: 0 }, result!.parts, fds);
    } catch (err) {
      this.replyFailed(h, (err as Error).message);
    }
  }

  /** A reply that cannot go out becomes EIO (never a silent drop, never a crash). */
  private replyFailed(h: Header, reason: string): void {
    this.logLimited("error", { msgId: h.msgId, cmd: cmdName(h.command), errno: Errno.EIO, reason }, "reply failed; answered EIO");
    try {
      this.sendError(h, Errno.EIO);
    } catch (err) {
      this.log.error({ err, msgId: h.msgId, cmd: cmdName(h.command) }, "error reply failed; closing the connection");
      this.opts.transport.close();
    }
  }

  private sendError(h: Header, errno: number): void {
    if (this.closed) return;
    this.send({ msgId: h.msgId, command: h.command, size: 0, flags: HeaderFlags.TYPE_REPLY | HeaderFlags.ERROR, error: errno }, []);
  }

  /** The one place messages are framed. */
  private send(h: Header, parts: readonly Uint8Array[], fds?: readonly number[]): void {
    let size = HEADER_SIZE;
    for (let i = 0; i < parts.length; i++) size += parts[i]!.length;
    h.size = size;
    if (this.trace) {
      const isReply = (h.flags & HeaderFlags.TYPE_MASK) === HeaderFlags.TYPE_REPLY;
      const fields = h.error ? {} : traceFields(h.command, Buffer.concat(parts), isReply);
      this.log.info({ msgId: h.msgId, cmd: cmdName(h.command), size, errno: h.error || undefined, ...fields }, "send");
    }
    if (size <= REPLY_COPY_MAX) {
      // one buffer, reused: header and parts copied in, sent as one iovec
      const buf = this.replyBuf;
      writeHeader(this.replyView, 0, h);
      let at = HEADER_SIZE;
      for (let i = 0; i < parts.length; i++) {
        const p = parts[i]!;
        buf.set(p, at);
        at += p.length;
      }
      const list = this.sendList;
      list[0] = this.replyViews[size] ??= buf.subarray(0, size);
      this.opts.transport.send(list, fds);
      return;
    }
    const head = Buffer.allocUnsafe(HEADER_SIZE);
    writeHeader(viewOf(head), 0, h);
    this.opts.transport.send([head, ...parts], fds);
  }

  // ---- server-to-client requests ----

  private onReply(frame: Frame): void {
    if (frame.fds.length > 0) this.conformance?.reply("fds-on-reply", frame.header, null, `${frame.fds.length} fd(s) with a reply`);
    for (const fd of frame.fds) this.opts.closeFd(fd); // spec: no fds expected in DMA replies
    if (!this.pending.settle(frame)) {
      this.conformance?.reply("reply-unmatched", frame.header, null, `reply with msgId ${frame.header.msgId} to no request of ours`);
      this.logLimited("warn", { msgId: frame.header.msgId, cmd: cmdName(frame.header.command) }, "reply to no request of ours; ignored");
    }
  }

  private request(command: number, parts: readonly Uint8Array[]): Promise<Frame> {
    if (this.closed) return Promise.reject(fail.fault("client disconnected"));
    return this.pending.start(command, (msgId) => this.send({ msgId, command, size: 0, flags: HeaderFlags.TYPE_COMMAND, error: 0 }, parts));
  }

  async dmaRead(address: bigint, length: number): Promise<Buffer> {
    const max = this.opts.session.maxDataXferSize;
    const out = Buffer.allocUnsafe(length);
    for (let done = 0; done < length; ) {
      const n = Math.min(max, length - done);
      const at = address + BigInt(done);
      const frame = await this.request(Command.DMA_READ, [encodeDmaReadRequest({ address: at, count: BigInt(n) })]);
      const r = this.checkedReply(frame, decodeDmaReadReply, n);
      if (r.address !== at || r.count !== BigInt(n) || r.data.length !== n) throw this.replyMismatch(frame, "DMA_READ reply does not match the request", r.address !== at ? 0 : 8);
      out.set(r.data, done);
      done += n;
    }
    return out;
  }

  async dmaWrite(address: bigint, data: Uint8Array): Promise<void> {
    const max = this.opts.session.maxDataXferSize;
    for (let done = 0; done < data.length; ) {
      const n = Math.min(max, data.length - done);
      const at = address + BigInt(done);
      const frame = await this.request(Command.DMA_WRITE, encodeDmaWriteRequestParts({ address: at, count: BigInt(n), data: data.subarray(done, done + n) }));
      const r = this.checkedReply(frame, decodeDmaWriteReply);
      // QEMU acknowledges with an empty body; a peer that echoes must echo this request
      if (r.address === undefined) this.conformance?.reply("dma-write-reply-empty", frame.header, 0, "DMA_WRITE reply without address and count (an empty body)");
      else if (r.address !== at || r.count !== n) throw this.replyMismatch(frame, "DMA_WRITE reply does not match the request", r.address !== at ? 0 : 8);
      done += n;
    }
  }

  /** Decodes the client's reply to our DMA_READ/DMA_WRITE; a reply the codec refuses goes into the conformance report. */
  private checkedReply<T>(frame: Frame, decode: (body: Buffer) => T, asked?: number): T {
    try {
      return decode(frame.body);
    } catch (err) {
      if (this.conformance !== null) {
        const offset = err instanceof VfioUserError ? (err.fact?.offset ?? null) : null;
        // a u32 count (QEMU 10.2's VFIOUserDMARW) puts the count asked for in the low half and data at offset 12
        const u32 = asked !== undefined && frame.body.length >= 16 && frame.body.readUInt32LE(8) === asked;
        this.conformance.reply("dma-reply-count", frame.header, offset, `${(err as Error).message}${u32 ? `; its low 32 bits are the ${asked} asked for: a u32 count, data at offset 12` : ""}`);
      }
      throw err;
    }
  }

  private replyMismatch(frame: Frame, reason: string, offset: number): VfioUserError {
    this.conformance?.reply("dma-reply-count", frame.header, offset, reason);
    return fail.io(reason);
  }

  /** Called after VERSION: frames may now be as large as the negotiated transfer size allows. */
  setMaxDataXferSize(size: number): void {
    this.decoder.maxFrameSize = maxFrameSizeFor(size);
  }

  /**
   * A log line the client can provoke: at most a burst, then one a second
   * per message; the next line let through says how many were dropped.
   */
  logLimited(level: "debug" | "info" | "warn" | "error", fields: Record<string, unknown>, msg: string, key: string = msg): void {
    if (!this.log.isLevelEnabled(level)) return;
    const suppressed = this.limiter.take(key);
    if (suppressed < 0) return;
    this.log[level](suppressed > 0 ? { ...fields, suppressed } : fields, msg);
  }

  // ---- teardown ----

  private onTransportClose(err?: Error): void {
    if (this.closed) return;
    this.closed = true;
    if (err) this.log.warn({ err: err.message }, "connection failed");
    for (const frame of this.queue) for (const fd of frame.fds) this.opts.closeFd(fd);
    // fds that came with a frame that never completed
    for (const fd of this.decoder.close()) this.opts.closeFd(fd);
    this.queue.length = 0;
    this.pending.rejectAll(fail.fault("client disconnected"));
    this.conformance?.left(this.opts.endpoint.dirtyLog !== null);
    this.opts.endpoint.detachClient();
    const suppressed = this.limiter.totalSuppressed;
    this.log.info(suppressed > 0 ? { suppressedLogLines: suppressed } : {}, "client disconnected");
    this.opts.onClose?.();
  }
}

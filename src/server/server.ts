/**
 * The server: one device, one UNIX socket, one client at a time. A second
 * client is refused (closed at once, logged); after a client leaves, the next
 * one finds the device as the last one left it.
 */
import type { Logger } from "pino";
import type { Device } from "../device/api.ts";
import { ConformanceRecorder, type ClientReport, type ConformanceOptions } from "../conformance/recorder.ts";
import { formatClientReport, formatConformanceReport } from "../conformance/report.ts";
import type { Fault } from "../faults/language.ts";
import { silentLogger } from "../log.ts";
import type { MigrationOptions } from "../migration/controller.ts";
import { native } from "../transport/native.ts";
import { UnixServer, type UnixConnection } from "../transport/unix-socket.ts";
import type { Transport } from "../transport/types.ts";
import { Connection } from "./connection.ts";
import type { Handler } from "./dispatcher.ts";
import { Endpoint } from "./endpoint.ts";
import { buildHandlerTable } from "./handlers/index.ts";
import { DEFAULT_LIMITS, Session, type ServerLimits } from "./session.ts";

export interface ServerOptions {
  device: Device;
  log?: Logger;
  limits?: Partial<ServerLimits>;
  /** Log every message (command, size, key fields). */
  trace?: boolean;
  /** Extra handlers (migration adds its commands here). */
  handlers?: Iterable<[number, Handler]>;
  /** Timeout of server-to-client requests (DMA_READ/WRITE), ms. */
  requestTimeoutMs?: number;
  /** Migration options (P2P states offered or not), forwarded to the endpoint. */
  migration?: MigrationOptions;
  /**
   * Keep a client conformance report (src/conformance): true, its options,
   * or a recorder of your own. Each client's table is logged when it leaves,
   * every client's when the server closes; `conformance.report()` is the
   * JSON. Replies are the same with and without it.
   */
  conformance?: boolean | ConformanceOptions | ConformanceRecorder;
  /**
   * Faults to inject (src/faults; the language: docs/faults.md), as specs or
   * parsed. A spec that does not parse throws FaultSyntaxError here.
   */
  faults?: readonly (string | Fault)[];
}

/**
 * The server's own accounting of what clients made it hold: maxima over
 * every connection so far (closed ones included) and the device's resume
 * streams. Tests bound these instead of the process's RSS, which measures
 * the allocator as much as the server.
 */
export interface ServerStats {
  /** Most bytes a connection's frame decoder held at once for an incomplete frame. */
  decoderHighWater: number;
  /** Most bytes a connection's transport had queued unsent (a client not reading its replies). */
  sendQueueHighWater: number;
  /** Most bytes of a resume stream the device's migration held at once (MigrationController.resumeBufferHighWater). */
  resumeBufferHighWater: number;
}

function closeFd(fd: number): void {
  if (fd >= 0) native.close(fd);
}

export class VfioUserServer {
  readonly endpoint: Endpoint;
  readonly log: Logger;
  private readonly limits: ServerLimits;
  private readonly handlers;
  private current: Connection | null = null;
  private listener: UnixServer | null = null;
  private connCounter = 0;
  /** High-water marks of the connections that have closed. */
  private closedStats = { decoderHighWater: 0, sendQueueHighWater: 0 };
  /** The client conformance report, when the options asked for one. */
  readonly conformance: ConformanceRecorder | null;

  constructor(private readonly opts: ServerOptions) {
    this.log = opts.log ?? silentLogger();
    this.conformance = makeRecorder(opts.conformance, (r) => this.logClientReport(r));
    this.limits = { ...DEFAULT_LIMITS, ...opts.limits };
    this.endpoint = new Endpoint(opts.device, { log: this.log, maxDmaMaps: this.limits.maxDmaMaps, closeFd, migration: opts.migration, faults: opts.faults });
    this.handlers = buildHandlerTable(opts.handlers);
  }

  /** Listens on a UNIX socket (mode 0600 unless given). */
  listen(socketPath: string, mode = 0o600): void {
    this.listener = UnixServer.listen(socketPath, {
      mode,
      onConnection: (c: UnixConnection) => this.accept(c),
      onError: (err) => this.log.warn({ err: err.message }, "accept failed"),
    });
    this.log.info({ socket: socketPath, device: this.opts.device.type }, "listening");
  }

  /** Serves a client over any transport (sockets, or an in-memory pair in tests). */
  accept(transport: Transport): Connection | null {
    if (this.current) {
      this.log.warn({ peer: transport.peer }, "refused a second client: one client at a time");
      transport.start({ data: (_chunk, fds) => fds.forEach(closeFd), close: () => {} });
      transport.close();
      return null;
    }
    const id = ++this.connCounter;
    const log = this.log.child({ conn: id });
    const session = new Session(this.limits);
    session.conformance = this.conformance?.client(id, transport.peer ?? null) ?? null;
    const conn = new Connection({
      transport,
      endpoint: this.endpoint,
      handlers: this.handlers,
      session,
      log,
      closeFd,
      trace: this.opts.trace,
      requestTimeoutMs: this.opts.requestTimeoutMs,
      onClose: () => {
        this.closedStats.decoderHighWater = Math.max(this.closedStats.decoderHighWater, conn.decoderHighWater);
        this.closedStats.sendQueueHighWater = Math.max(this.closedStats.sendQueueHighWater, conn.sendQueueHighWater);
        if (this.current === conn) this.current = null;
      },
    });
    session.onNegotiated = (size) => conn.setMaxDataXferSize(size);
    this.current = conn;
    log.info({ peer: transport.peer }, "client connected");
    conn.start();
    return conn;
  }

  private logClientReport(r: ClientReport): void {
    const deviations = r.deviations.map((d) => ({ id: d.id, severity: d.severity, cmd: d.command, count: d.count, msgId: d.first.msgId, offset: d.first.offset }));
    this.log.info({ conn: r.conn, errors: r.errors, warnings: r.warnings, deviations, table: formatClientReport(r) }, "client conformance report");
  }

  get connection(): Connection | null {
    return this.current;
  }

  /** High-water marks over all connections so far, the current one included (see ServerStats). */
  stats(): ServerStats {
    const c = this.current;
    return {
      decoderHighWater: Math.max(this.closedStats.decoderHighWater, c?.decoderHighWater ?? 0),
      sendQueueHighWater: Math.max(this.closedStats.sendQueueHighWater, c?.sendQueueHighWater ?? 0),
      resumeBufferHighWater: this.endpoint.migration.resumeBufferHighWater,
    };
  }

  private disposed: Promise<void> | null = null;

  /**
   * Stops listening, drops the client, removes the socket file, and lets
   * the device go (its `dispose` hook, once). Resolves when the device has
   * finished disposing; a failing hook is logged, not thrown.
   */
  close(): Promise<void> {
    this.listener?.close();
    this.listener = null;
    this.current?.close();
    if (this.conformance !== null && this.disposed === null) {
      const report = this.conformance.report();
      this.log.info({ errors: report.errors, warnings: report.warnings, table: formatConformanceReport(report) }, "client conformance report, all connections");
    }
    this.disposed ??= (async () => {
      try {
        await this.opts.device.dispose?.();
      } catch (err) {
        this.log.error({ err: (err as Error).message }, "device dispose failed");
      }
    })();
    return this.disposed;
  }
}

function makeRecorder(opt: ServerOptions["conformance"], onClientDone: (r: ClientReport) => void): ConformanceRecorder | null {
  if (opt === undefined || opt === false) return null;
  if (opt instanceof ConformanceRecorder) return opt;
  const given = opt === true ? {} : opt;
  return new ConformanceRecorder({
    ...given,
    onClientDone: (r) => {
      // the caller's hook first (serve --client-report writes its file there), then the log
      // line: whoever sees the line can read the file (a test read it in between once)
      try {
        given.onClientDone?.(r);
      } finally {
        onClientDone(r);
      }
    },
  });
}

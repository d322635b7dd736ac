/**
 * The client conformance report: what each client did that the spec (or
 * VFIO's migration rules) does not allow, recorded where the server judges
 * the message, never changing what it answers.
 *
 * A ConformanceRecorder belongs to a server; each connection gets a
 * ClientConformance. The connection tells it of every command it
 * dispatches (observe), of every refusal (refused: the refusal's WireFact
 * names the rule, else it counts as "request-refused"), and of frames that
 * stay incomplete; handlers note what they accepted although it deviates
 * (note). A refusal is named once: by the rule its error's fact names (a
 * detector where the server judged it), else as "request-refused".
 */
import { Command, Feature, FeatureFlags, HEADER_SIZE } from "../../protocol/constants.ts";
import { VfioUserError } from "../../protocol/errors.ts";
import type { Header } from "../../protocol/header.ts";
import { DEVIATIONS, commandName, isDeviationId, sectionOf, type DeviationId, type Severity } from "./catalogue.ts";

/** Where a deviation was first seen. */
export interface FirstSeen {
  /** The message's id (for a reply, the id of the server's request it answers). */
  msgId: number;
  /** Byte offset of the offending field from the start of the body (after the 16-byte header); null when no single field. */
  offset: number | null;
  /** What exactly was wrong (the server's reason). */
  detail: string;
  /** How many client messages had arrived on this connection by then (1 = the first). */
  message: number;
}

export interface DeviationRecord {
  id: DeviationId;
  severity: Severity;
  command: string;
  rule: string;
  section: string;
  count: number;
  first: FirstSeen;
}

export interface ClientReport {
  conn: number;
  peer: string | null;
  connectedAt: string;
  disconnectedAt: string | null;
  messages: number;
  errors: number;
  warnings: number;
  deviations: DeviationRecord[];
}

export interface ConformanceReport {
  clients: ClientReport[];
  errors: number;
  warnings: number;
}

export interface ConformanceOptions {
  /** A frame whose bytes stop arriving for this long is "frame-incomplete" (ms, default 2000). */
  incompleteFrameMs?: number;
  /** Called with each client's report when it disconnects. */
  onClientDone?: (report: ClientReport) => void;
}

const DEFAULT_INCOMPLETE_MS = 2000;

/** The WireFact rule of an error a fault injected (src/faults): never a client deviation. */
export const INJECTED_FAULT = "injected-fault";

export class ClientConformance {
  private readonly records = new Map<string, DeviationRecord>();
  private messageCount = 0;
  private readonly connectedAt = new Date();
  private disconnectedAt: Date | null = null;
  /** The last DMA_LOGGING_START request (the message a log left running traces back to). */
  private loggingStart: Header | null = null;
  /** STOP_COPY: the stream's end (an empty MIG_DATA_READ reply) was returned. */
  private streamEnded = false;
  /** A frame that stopped arriving: the timer, and the frame it was armed for. */
  private incompleteTimer: NodeJS.Timeout | null = null;
  private incompleteFor: Header | "header" | null = null;
  private incompleteNamed: Header | "header" | null = null;

  constructor(
    readonly conn: number,
    readonly peer: string | null,
    private readonly incompleteFrameMs: number,
    private readonly onDone?: (report: ClientReport) => void,
  ) {}

  /** Every command the connection is about to dispatch, in order. */
  observe(header: Header, body: Buffer): void {
    this.messageCount++;
    // spec (Header): "[Error] is reserved in a command message"
    if (header.error !== 0) this.add("header-reserved", header, null, `header offset 12 (Error) is ${header.error} in a command`);
    if (header.command === Command.DEVICE_FEATURE && body.length >= 8) {
      const flags = body.readUInt32LE(4);
      const feature = flags & FeatureFlags.MASK;
      if ((flags & FeatureFlags.SET) !== 0 && (flags & FeatureFlags.PROBE) === 0) {
        if (feature === Feature.DMA_LOGGING_START) this.loggingStart = header;
        if (feature === Feature.MIG_DEVICE_STATE) this.streamEnded = false;
      }
    }
  }

  /** A deviation of a message the server accepted anyway (a warning). */
  note(id: DeviationId, header: Header, offset: number | null, detail: string): void {
    this.add(id, header, offset, detail);
  }

  /**
   * The server refused a client message with `err`. Only VfioUserErrors are
   * the client's doing: anything else is the server failing (EIO), and an
   * injected fault (fact rule INJECTED_FAULT) is the test bench's.
   */
  refused(header: Header, err: unknown): void {
    if (!(err instanceof VfioUserError)) return;
    const fact = err.fact;
    if (fact?.rule === INJECTED_FAULT) return;
    const id: DeviationId = fact && isDeviationId(fact.rule) ? fact.rule : "request-refused";
    this.add(id, header, fact?.offset ?? null, err.message);
  }

  /** A header the decoder refused (the connection closes). */
  badFrame(header: Header | undefined, reason: string, unknownCommand: boolean): void {
    const h = header ?? { msgId: 0, command: 0, size: 0, flags: 0, error: 0 };
    this.add(unknownCommand ? "unknown-command" : "bad-frame", h, null, reason);
  }

  /**
   * After each chunk: bytes the decoder holds for an unfinished frame and
   * its header (undefined while fewer than 16 bytes of it arrived). A frame
   * that makes no progress for incompleteFrameMs is named once.
   */
  buffered(bytes: number, header: Header | undefined): void {
    if (this.incompleteTimer !== null) {
      clearTimeout(this.incompleteTimer);
      this.incompleteTimer = null;
    }
    if (bytes === 0) {
      this.incompleteFor = null;
      return;
    }
    const frame = header ?? "header";
    this.incompleteFor = frame;
    if (this.incompleteNamed === frame && frame !== "header") return;
    this.incompleteTimer = setTimeout(() => {
      this.incompleteTimer = null;
      if (this.incompleteFor !== frame) return;
      this.incompleteNamed = frame;
      if (frame === "header") {
        this.add("frame-incomplete", { msgId: 0, command: 0, size: 0, flags: 0, error: 0 }, null, `${bytes} bytes of a header, then nothing for ${this.incompleteFrameMs} ms`);
      } else {
        const body = bytes - HEADER_SIZE;
        this.add(
          "frame-incomplete",
          frame,
          body,
          `${bytes} of the ${frame.size} bytes its header announces arrived, then nothing for ${this.incompleteFrameMs} ms (the body stops at offset ${body}); the message is never served`,
        );
      }
    }, this.incompleteFrameMs);
    this.incompleteTimer.unref();
  }

  /** A reply of the client to the server's DMA_READ/DMA_WRITE that the server could not use, or used liberally. */
  reply(id: "dma-reply-count" | "dma-write-reply-empty" | "fds-on-reply" | "reply-unmatched", header: Header, offset: number | null, detail: string): void {
    this.add(id, header, offset, detail);
  }

  /** A MIG_DATA_READ served: in STOP_COPY, one after an empty reply reads past the end. */
  migDataRead(header: Header, stopCopy: boolean, returned: number): void {
    if (!stopCopy) return;
    if (this.streamEnded) this.note("mig-data-read-after-end", header, null, "MIG_DATA_READ after the stream's end was returned (an empty reply)");
    if (returned === 0) this.streamEnded = true;
  }

  /** The client is gone; `dmaLogging`: its DMA log was still running. Hands the report to onClientDone. */
  left(dmaLogging: boolean): void {
    if (this.disconnectedAt !== null) return;
    if (this.incompleteTimer !== null) clearTimeout(this.incompleteTimer);
    this.incompleteTimer = null;
    if (dmaLogging) {
      const h = this.loggingStart ?? { msgId: 0, command: Command.DEVICE_FEATURE, size: 0, flags: 0, error: 0 };
      this.add("dma-logging-not-stopped", h, null, "the client left with DMA logging on and never sent DMA_LOGGING_STOP (the server stopped it)");
    }
    this.disconnectedAt = new Date();
    this.onDone?.(this.report());
  }

  get connected(): boolean {
    return this.disconnectedAt === null;
  }

  report(): ClientReport {
    const deviations = [...this.records.values()].map((r) => ({ ...r, first: { ...r.first } }));
    return {
      conn: this.conn,
      peer: this.peer,
      connectedAt: this.connectedAt.toISOString(),
      disconnectedAt: this.disconnectedAt?.toISOString() ?? null,
      messages: this.messageCount,
      errors: deviations.filter((d) => d.severity === "error").length,
      warnings: deviations.filter((d) => d.severity === "warning").length,
      deviations,
    };
  }

  private add(id: DeviationId, header: Header, offset: number | null, detail: string): void {
    const command = commandName(header.command);
    const key = `${id}|${command}`;
    const have = this.records.get(key);
    if (have) {
      have.count++;
      return;
    }
    const kind = DEVIATIONS[id];
    this.records.set(key, {
      id,
      severity: kind.severity,
      command,
      rule: kind.rule,
      section: sectionOf(id, header.command),
      count: 1,
      first: { msgId: header.msgId, offset, detail, message: this.messageCount },
    });
  }
}

/** A server's recorder: one ClientConformance per connection, all kept for the final report. */
export class ConformanceRecorder {
  private readonly clients: ClientConformance[] = [];
  readonly incompleteFrameMs: number;
  private readonly onClientDone?: (report: ClientReport) => void;

  constructor(opts: ConformanceOptions = {}) {
    this.incompleteFrameMs = opts.incompleteFrameMs ?? DEFAULT_INCOMPLETE_MS;
    this.onClientDone = opts.onClientDone;
  }

  /** A recorder for a new connection. */
  client(conn: number, peer: string | null): ClientConformance {
    const c = new ClientConformance(conn, peer, this.incompleteFrameMs, this.onClientDone);
    this.clients.push(c);
    return c;
  }

  /** Every client so far, connected or not. */
  report(): ConformanceReport {
    const clients = this.clients.map((c) => c.report());
    return {
      clients,
      errors: clients.reduce((n, c) => n + c.errors, 0),
      warnings: clients.reduce((n, c) => n + c.warnings, 0),
    };
  }
}

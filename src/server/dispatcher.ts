/**
 * The table from command to handler. Handlers decode their body, act on the
 * endpoint, and return the reply body; errors are thrown as VfioUserError
 * and framed by the connection. Replies are framed in one place only.
 */
import type { Logger } from "pino";
import type { Header } from "../../protocol/header.ts";
import type { Endpoint } from "./endpoint.ts";
import type { Session } from "./session.ts";
import type { SocketDma } from "../dma/dma-engine.ts";

/** What a handler gets: the decoded header, the raw body, and the fds that came with it. */
export interface Request {
  readonly header: Header;
  /** The body (after the header); a view valid until the handler's reply is sent. */
  readonly body: Buffer;
  /** Fds received with this message; take the ones you keep, the rest are closed after the reply. */
  readonly fds: number[];
  readonly session: Session;
  readonly endpoint: Endpoint;
  readonly log: Logger;
  /** DMA over this connection's socket, for handlers that need the client. */
  readonly socketDma: SocketDma;
  /** Log a line the client can provoke at will (rate limited per message). */
  logLimited(level: "debug" | "info" | "warn" | "error", fields: Record<string, unknown>, msg: string): void;
  /** Close the connection once this request's reply (or error reply) is sent. */
  closeAfterReply(): void;
}

/** A reply body as parts (header part and data part kept apart to avoid copies) and fds to send. */
export interface Reply {
  parts: readonly Uint8Array[];
  fds?: readonly number[];
}

export type Handler = (req: Request) => Reply | Promise<Reply>;

export const EMPTY_REPLY: Reply = Object.freeze({ parts: [] });

export function reply(...parts: Uint8Array[]): Reply {
  return { parts };
}

export type HandlerTable = ReadonlyMap<number, Handler>;

/**
 * What one client connection negotiated with VERSION, and the limits the
 * server applies to it. Defaults are the spec's for a client that omits a
 * capability.
 */
import { Defaults } from "../../protocol/constants.ts";
import type { ClientConformance } from "../conformance/recorder.ts";

export interface ServerLimits {
  /** Largest data transfer the server accepts or sends in one message. */
  maxDataXferSize: number;
  /** Most fds the server accepts in one message. */
  maxMsgFds: number;
  maxDmaMaps: number;
  /** Dirty-page bitmap page size offered for migration. */
  migrationPgsize: bigint;
  maxBitmapSize: bigint;
}

export const DEFAULT_LIMITS: ServerLimits = {
  maxDataXferSize: Defaults.MAX_DATA_XFER_SIZE,
  maxMsgFds: 16,
  maxDmaMaps: Defaults.MAX_DMA_MAPS,
  migrationPgsize: BigInt(Defaults.PGSIZE),
  maxBitmapSize: 256n * 1024n * 1024n,
};

export class Session {
  versionDone = false;
  /** Negotiated: what both sides accept. */
  maxDataXferSize: number;
  /** Most fds the client accepts from us in one message. */
  clientMaxMsgFds: number = Defaults.MAX_MSG_FDS;

  /** This client's conformance report, when the server keeps one (handlers note what they accepted liberally). */
  conformance: ClientConformance | null = null;

  /** Set by the connection: the frame limit follows the negotiated transfer size. */
  onNegotiated?: (maxDataXferSize: number) => void;

  constructor(readonly limits: ServerLimits) {
    this.maxDataXferSize = limits.maxDataXferSize;
  }
}

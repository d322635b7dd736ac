/**
 * What one client connection negotiated with VERSION, and the limits the
 * server applies to it. Defaults are the spec's for a client that omits a
 * capability.
 */
import { Defaults } from "../../protocol/constants.ts";
import type { ClientConformance } from "../conformance/recorder.ts";
import { MAX_REPORT_BYTES } from "../dma/dirty-bitmap.ts";

export interface ServerLimits {
  /** Largest data transfer the server accepts or sends in one message. */
  maxDataXferSize: number;
  /** Most fds the server accepts in one message. */
  maxMsgFds: number;
  maxDmaMaps: number;
  /** Dirty-page bitmap page sizes offered for migration (a mask of powers of two). */
  migrationPgsize: bigint;
  /** Largest DMA_LOGGING_REPORT bitmap served, in bytes (capped at what the dirty log can report). */
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
  /** Negotiated: the largest DMA_LOGGING_REPORT bitmap, in bytes (the smaller of both sides' max_bitmap_size). */
  maxBitmapSize: number;
  /** Negotiated: DMA_LOGGING_START's page size when the client gives none (the smallest negotiated pgsize). */
  migrationPgsize: bigint;

  /** This client's conformance report, when the server keeps one (handlers note what they accepted liberally). */
  conformance: ClientConformance | null = null;

  /** Set by the connection: the frame limit follows the negotiated transfer size. */
  onNegotiated?: (maxDataXferSize: number) => void;

  constructor(readonly limits: ServerLimits) {
    this.maxDataXferSize = limits.maxDataXferSize;
    this.maxBitmapSize = servedBitmapSize(limits);
    this.migrationPgsize = lowestBit(limits.migrationPgsize);
  }
}

/** The largest report bitmap this server can serve: its limit, within what the dirty log reports at once. */
export function servedBitmapSize(limits: ServerLimits): number {
  return Math.min(Number(limits.maxBitmapSize), MAX_REPORT_BYTES);
}

/** The smallest page size in a page-size mask. */
export function lowestBit(mask: bigint): bigint {
  return mask & -mask;
}

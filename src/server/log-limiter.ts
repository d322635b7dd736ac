/**
 * Rate limiting for log lines a client can provoke at will (refusals,
 * stray replies, resets): a token bucket per message, so an attack costs a
 * bounded number of lines. The next line let through carries how many were
 * suppressed since the last one.
 */
export interface LogLimiterOptions {
  /** Lines let through at once. */
  burst?: number;
  /** Lines per second after the burst. */
  perSecond?: number;
  now?: () => number;
}

interface Bucket {
  tokens: number;
  last: number;
  suppressed: number;
}

export class LogLimiter {
  private readonly buckets = new Map<string, Bucket>();
  private readonly burst: number;
  private readonly perMs: number;
  private readonly now: () => number;
  /** Lines suppressed over the limiter's life, all keys. */
  totalSuppressed = 0;

  constructor(opts: LogLimiterOptions = {}) {
    this.burst = opts.burst ?? 20;
    this.perMs = (opts.perSecond ?? 1) / 1000;
    this.now = opts.now ?? Date.now;
  }

  /**
   * -1 when the line for `key` must be dropped; otherwise the number of
   * lines suppressed since the last one let through (usually 0).
   */
  take(key: string): number {
    const t = this.now();
    let b = this.buckets.get(key);
    if (!b) {
      b = { tokens: this.burst, last: t, suppressed: 0 };
      this.buckets.set(key, b);
    }
    b.tokens = Math.min(this.burst, b.tokens + (t - b.last) * this.perMs);
    b.last = t;
    if (b.tokens < 1) {
      b.suppressed++;
      this.totalSuppressed++;
      return -1;
    }
    b.tokens -= 1;
    const n = b.suppressed;
    b.suppressed = 0;
    return n;
  }
}

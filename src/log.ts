/**
 * Logging: pino, human-readable on a TTY (pino-pretty), JSON otherwise.
 * One child logger per connection carries `conn`; message fields use the
 * names msgId, cmd, size, errno, region, offset, count, from, to.
 */
import { pino, type Logger, type LevelWithSilent } from "pino";

export type { Logger };

export interface LogOptions {
  level?: LevelWithSilent;
  /** Force pretty or JSON output; default: pretty on a TTY. */
  pretty?: boolean;
  /** Where JSON goes; default stderr (fd 2), so stdout stays for the CLI's own output. */
  destination?: number;
}

export function createLogger(opts: LogOptions = {}): Logger {
  const level = opts.level ?? "info";
  const fd = opts.destination ?? 2;
  const pretty = opts.pretty ?? Boolean(process.stderr.isTTY);
  if (pretty) {
    return pino({
      level,
      transport: { target: "pino-pretty", options: { destination: fd, colorize: true, translateTime: "HH:MM:ss.l", ignore: "pid,hostname" } },
    });
  }
  return pino({ level, base: undefined }, pino.destination({ fd, sync: true }));
}

/** A logger that drops everything, for tests and library use. */
export function silentLogger(): Logger {
  return pino({ level: "silent" });
}

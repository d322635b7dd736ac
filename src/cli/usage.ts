/**
 * Usage errors and argument parsing shared by every subcommand: a usage
 * error is one line on stderr, a pointer to the command's --help, and exit
 * status 2.
 */
import { parseArgs, type ParseArgsConfig } from "node:util";
import type { DeviceOptions } from "../device/api.ts";

/** Bad command line: `vfio-user-ts: MESSAGE` and `Try 'vfio-user-ts COMMAND --help'.`, exit 2. */
export class UsageError extends Error {
  override readonly name = "UsageError";
  constructor(
    message: string,
    /** The subcommand whose --help the pointer names ("serve", "snapshot"...); none: the top-level help. */
    readonly command?: string,
  ) {
    super(message);
  }

  /** The two lines the CLI prints. */
  lines(): [string, string] {
    return [`vfio-user-ts: ${this.message}`, `Try 'vfio-user-ts ${this.command ? `${this.command} ` : ""}--help'.`];
  }
}

/** node:util parseArgs, strict, with its errors turned into a UsageError for `command`. */
type Options = NonNullable<ParseArgsConfig["options"]>;
/** What parseArgs returns for these options. */
export type ParsedArgs<T extends Options> = ReturnType<typeof parseArgs<{ options: T; strict: true; allowPositionals: true }>>;

export function parseCommandArgs<T extends Options>(command: string, argv: readonly string[], options: T, allowPositionals = false): ParsedArgs<T> {
  try {
    return parseArgs({ args: [...argv], options, strict: true, allowPositionals }) as ParsedArgs<T>;
  } catch (err) {
    // parseArgs messages can run over several lines ("... To specify a positional argument starting with a '-' ...")
    throw new UsageError((err as Error).message.split("\n")[0]!.replace(/\.\s.*$/, ""), command);
  }
}

export const LEVELS = ["fatal", "error", "warn", "info", "debug", "trace", "silent"] as const;
export type Level = (typeof LEVELS)[number];

export function checkLevel(value: string | undefined, command: string): Level {
  const level = (value ?? "info") as Level;
  if (!LEVELS.includes(level)) throw new UsageError(`--log-level must be one of ${LEVELS.join(", ")}, got '${value}'`, command);
  return level;
}

/** `--opt KEY=VALUE` items as DeviceOptions; a key given twice is an error. */
export function deviceOptionArgs(list: readonly string[] | undefined, command: string): DeviceOptions {
  const out: Record<string, string> = {};
  for (const item of list ?? []) {
    const eq = item.indexOf("=");
    if (eq <= 0) throw new UsageError(`--opt takes KEY=VALUE, got '${item}'`, command);
    const key = item.slice(0, eq);
    if (Object.hasOwn(out, key)) throw new UsageError(`--opt ${key} given twice`, command);
    out[key] = item.slice(eq + 1);
  }
  return out;
}

/** `KEY=VALUE` items back from DeviceOptions (for child processes). */
export function deviceOptionList(options: DeviceOptions): string[] {
  return Object.entries(options).map(([k, v]) => `${k}=${v}`);
}

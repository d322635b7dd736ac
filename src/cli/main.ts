/**
 * The `vfio-user-ts` command line. Each subcommand has --help; bad options
 * get a one-line error and exit status 2.
 */
import { existsSync, statSync } from "node:fs";
import path from "node:path";
import { parseArgs } from "node:util";
import { DEVICES, findDevice } from "../../devices/index.ts";
import type { DeviceOptions } from "../device/api.ts";
import { createLogger } from "../log.ts";
import { VfioUserServer } from "../server/server.ts";
import { DEMO_MIGRATE_USAGE, demoMigrateMain } from "./demo-migrate.ts";
import { snapshotMain } from "./snapshot.ts";
import { checkCommand } from "./check.ts";
import { BENCH_OPTIONS, BENCH_USAGE, benchFromArgs } from "./serve-bench.ts";

const USAGE = `Usage: vfio-user-ts <command> [options]

Commands:
  serve      serve a device on a UNIX socket for QEMU's vfio-user-pci
  devices    list the devices this build ships
  check      run the device compliance suite against a device (no QEMU needed)
  demo migrate
             live-migrate a bigmem device between two servers and check it
  snapshot save|restore
             save a device's state to a file, or load it back

Run 'vfio-user-ts <command> --help' for a command's options.`;

const SERVE_USAGE = `Usage: vfio-user-ts serve --socket PATH [options]

Options:
  --device NAME        device to serve (default: edu; see 'vfio-user-ts devices')
  --socket PATH        UNIX socket to listen on (its directory must exist)
  --opt KEY=VALUE      device option, repeatable (e.g. --opt size=256M)
  --socket-mode MODE   permissions of the socket file, octal (default 0600)
  --log-level LEVEL    fatal|error|warn|info|debug|trace|silent (default info)
  --log-format FORMAT  pretty|json (default: pretty on a terminal, else json)
  --trace              log every message received and sent
  --p2p                offer the P2P migration states (RUNNING_P2P, PRE_COPY_P2P)
${BENCH_USAGE}
  -h, --help           this text`;

export class UsageError extends Error {}

function parseDeviceOptions(list: string[] | undefined): DeviceOptions {
  const out: Record<string, string> = {};
  for (const item of list ?? []) {
    const eq = item.indexOf("=");
    if (eq <= 0) throw new UsageError(`--opt takes KEY=VALUE, got '${item}'`);
    out[item.slice(0, eq)] = item.slice(eq + 1);
  }
  return out;
}

const LEVELS = ["fatal", "error", "warn", "info", "debug", "trace", "silent"] as const;
type Level = (typeof LEVELS)[number];

/** The QEMU command line that attaches to a server on `socket`. */
export function qemuCommandLine(socket: string): string {
  const dev = JSON.stringify({ driver: "vfio-user-pci", socket: { path: path.resolve(socket), type: "unix" } });
  return [
    "qemu-system-x86_64 -machine q35 -m 512M -nodefaults -display none",
    "  -object memory-backend-memfd,id=mem,size=512M,share=on -machine memory-backend=mem",
    `  -device '${dev}'`,
  ].join(" \\\n");
}

async function serve(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      device: { type: "string", default: "edu" },
      socket: { type: "string" },
      opt: { type: "string", multiple: true },
      "socket-mode": { type: "string", default: "0600" },
      "log-level": { type: "string", default: "info" },
      "log-format": { type: "string" },
      trace: { type: "boolean", default: false },
      p2p: { type: "boolean", default: false },
      ...BENCH_OPTIONS,
      help: { type: "boolean", short: "h", default: false },
    },
    strict: true,
    allowPositionals: false,
  });
  if (values.help) {
    console.log(SERVE_USAGE);
    return 0;
  }
  if (!values.socket) throw new UsageError("serve needs --socket PATH");
  const level = values["log-level"] as Level;
  if (!LEVELS.includes(level)) throw new UsageError(`--log-level must be one of ${LEVELS.join(", ")}`);
  const format = values["log-format"];
  if (format !== undefined && format !== "pretty" && format !== "json") throw new UsageError("--log-format must be pretty or json");
  const mode = Number.parseInt(values["socket-mode"]!, 8);
  if (!/^0?[0-7]{3}$/.test(values["socket-mode"]!) || Number.isNaN(mode)) throw new UsageError(`--socket-mode must be octal like 0600, got '${values["socket-mode"]}'`);
  const bench = benchFromArgs(values, (m) => new UsageError(m));
  const factory = findDevice(values.device!);
  if (!factory) throw new UsageError(`unknown device '${values.device}'; known: ${DEVICES.map((d) => d.name).join(", ")}`);
  const dir = path.dirname(path.resolve(values.socket));
  if (!existsSync(dir) || !statSync(dir).isDirectory()) throw new UsageError(`socket directory ${dir} does not exist`);

  let device;
  try {
    device = factory.create(parseDeviceOptions(values.opt));
  } catch (err) {
    throw new UsageError(`device '${factory.name}': ${(err as Error).message}`);
  }
  const log = createLogger({ level, pretty: format === undefined ? undefined : format === "pretty" });
  const server = new VfioUserServer({ device, log, trace: values.trace, migration: { p2p: values.p2p }, ...bench.serverOptions });
  bench.attach(server);
  try {
    server.listen(values.socket, mode);
  } catch (err) {
    throw new UsageError((err as Error).message);
  }
  console.log(`vfio-user-ts: serving '${factory.name}' on ${path.resolve(values.socket)}`);
  console.log("Attach QEMU (11.1 or newer) with:\n");
  console.log(qemuCommandLine(values.socket));
  console.log("\n(For a scripted guest, add '-machine accel=qtest -qtest unix:QTEST.sock'; see README.)");
  await new Promise<void>((resolve) => {
    const stop = (signal: string) => {
      log.info({ signal }, "shutting down");
      void server.close().then(() => bench.stopped()).then(resolve);
    };
    process.once("SIGINT", () => stop("SIGINT"));
    process.once("SIGTERM", () => stop("SIGTERM"));
  });
  return 0;
}

function listDevices(argv: string[]): number {
  if (argv.includes("--help") || argv.includes("-h")) {
    console.log("Usage: vfio-user-ts devices\n\nLists the devices this build ships, with their --opt options.");
    return 0;
  }
  if (argv.length > 0) throw new UsageError(`devices takes no arguments, got '${argv[0]}'`);
  for (const d of DEVICES) console.log(`${d.name.padEnd(10)} ${d.description}`);
  return 0;
}

export async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  try {
    switch (command) {
      case "serve":
        return await serve(rest);
      case "devices":
        return listDevices(rest);
      case "check":
        return await checkCommand(rest);
      case "demo": {
        const [what, ...args] = rest;
        if (what === "migrate") return await demoMigrateMain(args);
        if (what === "-h" || what === "--help") {
          console.log(DEMO_MIGRATE_USAGE);
          return 0;
        }
        throw new UsageError(`unknown demo '${what ?? ""}'; try 'demo migrate'`);
      }
      case "snapshot":
        return await snapshotMain(rest);
      case undefined:
      case "-h":
      case "--help":
      case "help":
        console.log(USAGE);
        return command === undefined ? 2 : 0;
      default:
        throw new UsageError(`unknown command '${command}'`);
    }
  } catch (err) {
    if (err instanceof UsageError || (err as NodeJS.ErrnoException).code === "ERR_PARSE_ARGS_UNKNOWN_OPTION" || (err as NodeJS.ErrnoException).code?.startsWith("ERR_PARSE_ARGS")) {
      console.error(`vfio-user-ts: ${(err as Error).message}`);
      console.error("Try 'vfio-user-ts --help'.");
      return 2;
    }
    throw err;
  }
}

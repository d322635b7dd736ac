/**
 * The `vfio-user-ts` command line. Each subcommand has --help; a usage error
 * is one line, a pointer to the relevant --help, and exit status 2; any other
 * failure is one line and exit status 1.
 */
import { DEVICES } from "../../devices/index.ts";
import { describeOptions } from "../device/options.ts";
import { checkCommand } from "./check.ts";
import { DEMO_MIGRATE_USAGE, demoMigrateMain } from "./demo-migrate.ts";
import { installProcessHandlers, isInterrupted } from "./io.ts";
import { CommandError, qemuMain } from "./qemu.ts";
import { resetMain } from "./reset.ts";
import { packageVersion } from "./self.ts";
import { serveMain } from "./serve.ts";
import { snapshotMain } from "./snapshot.ts";
import { UsageError } from "./usage.ts";

export { qemuCommandLine } from "./qemu.ts";
export { UsageError } from "./usage.ts";

const USAGE = `Usage: vfio-user-ts <command> [options]

Commands:
  serve      serve a device on a UNIX socket for QEMU's vfio-user-pci
  qemu       start QEMU 11.1 attached to a running server (memfd RAM, optional Linux guest)
  devices    list the devices this package ships, with their --opt keys
  check      run the device compliance suite against a device (no QEMU needed)
  demo migrate
             live-migrate a device between two servers and check it
  snapshot save|restore
             save a device's state to a file, or load it back
  reset      reset the device behind a server's socket (DEVICE_RESET)

--device takes a shipped device's name or the path of your own module
(./my-device.js exporting a DeviceFactory as default or as 'factory').

Run 'vfio-user-ts <command> --help' for a command's options; --version
prints the version.`;

const DEVICES_USAGE = `Usage: vfio-user-ts devices

Lists the devices this package ships, each with its --opt keys (type, range,
default). Your own device module is given to --device by path.`;

function listDevices(argv: string[]): number {
  if (argv.includes("--help") || argv.includes("-h")) {
    console.log(DEVICES_USAGE);
    return 0;
  }
  if (argv.length > 0) throw new UsageError(`devices takes no arguments, got '${argv[0]}'`, "devices");
  const width = Math.max(...DEVICES.map((d) => d.name.length));
  for (const d of DEVICES) {
    console.log(`${d.name.padEnd(width)}  ${d.description}`);
    const opts = d.options ? describeOptions(d.options) : [];
    if (opts.length === 0) console.log(`${"".padEnd(width)}    (no options)`);
    for (const line of opts) console.log(`${"".padEnd(width)}    --opt ${line}`);
  }
  return 0;
}

/** Runs one command line; returns the exit status (usage errors: 2). */
export async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  try {
    switch (command) {
      case "serve":
        return await serveMain(rest);
      case "qemu":
        return await qemuMain(rest);
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
        throw new UsageError(what === undefined ? "demo needs a name: 'demo migrate'" : `unknown demo '${what}'; try 'demo migrate'`, "demo migrate");
      }
      case "snapshot":
        return await snapshotMain(rest);
      case "reset":
        return await resetMain(rest);
      case "-V":
      case "--version":
      case "version":
        console.log(`vfio-user-ts ${packageVersion()} (Node ${process.version})`);
        return 0;
      case "-h":
      case "--help":
      case "help":
        console.log(USAGE);
        return 0;
      case undefined:
        throw new UsageError("no command given");
      default:
        throw new UsageError(command.startsWith("-") ? `unknown option '${command}' (options come after the command)` : `unknown command '${command}'`);
    }
  } catch (err) {
    if (err instanceof UsageError) {
      for (const line of err.lines()) console.error(line);
      return 2;
    }
    if (err instanceof CommandError) {
      console.error(`vfio-user-ts: ${err.message}`);
      return 1;
    }
    throw err;
  }
}

/** The bin: process handlers (EPIPE, signals), then the command; sets the exit status. */
export async function runCli(argv: string[]): Promise<void> {
  installProcessHandlers();
  let code: number;
  try {
    code = await main(argv);
  } catch (err) {
    if (isInterrupted()) return;
    console.error(`vfio-user-ts: ${(err as Error).stack ?? String(err)}`);
    code = 1;
  }
  if (!isInterrupted()) process.exitCode = code;
}

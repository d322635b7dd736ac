/**
 * `vfio-user-ts check --device NAME [--opt KEY=VALUE]...`: the device
 * compliance suite from the command line. Prints each check with PASS or
 * FAIL (and why), then a summary. Exit status 0 when every check passed,
 * 1 when one failed, 2 for a usage error (unknown device, bad option).
 */
import { DEVICES } from "../../devices/index.ts";
import { CHECKS } from "../compliance/checks.ts";
import { formatCheckResult, runCompliance } from "../compliance/runner.ts";
import type { DeviceFactory, DeviceOptions } from "../device/api.ts";
import { createLogger, silentLogger } from "../log.ts";
import { createDevice, resolveDevice } from "./device-module.ts";
import { checkLevel, deviceOptionArgs, parseCommandArgs, UsageError } from "./usage.ts";

export const CHECK_USAGE = `Usage: vfio-user-ts check --device NAME|PATH [options]

Runs the compliance suite every device must pass: config space identity and
capability list, BAR sizing, the command register, reset to power-on, state
save/load, and migration between two servers (stop-copy, and live with
pre-copy). Each check talks to real servers over the vfio-user protocol, on
sockets in a temporary directory; no QEMU is needed.

Options:
  --device NAME|PATH   device to check (see 'vfio-user-ts devices'), or your
                       module (./my-device.js) exporting a DeviceFactory
  --opt KEY=VALUE      device option, repeatable (e.g. --opt size=1M)
  --only ID            run only this check, repeatable (see --list)
  --list               list the checks and exit
  -v, --verbose        also print timings and notes
  --log-level LEVEL    server log to stderr: fatal|error|warn|info|debug|trace|silent (default silent)
  -h, --help           this text

Exit status: 0 when every check passed, 1 when one failed, 2 on a usage error.`;

function describeOptions(o: DeviceOptions): string {
  const keys = Object.keys(o);
  return keys.length === 0 ? "no options" : `options ${keys.map((k) => `${k}=${o[k]}`).join(" ")}`;
}

/** Output sinks, replaceable in tests. */
export interface CheckIo {
  out(line: string): void;
  err(line: string): void;
}

const consoleIo: CheckIo = { out: (l) => console.log(l), err: (l) => console.error(l) };

/** Runs `check` with `argv` (the words after "check"); `devices` is the registry to pick from. */
export async function checkCommand(argv: string[], io: CheckIo = consoleIo, devices: readonly DeviceFactory[] = DEVICES): Promise<number> {
  try {
    const { values } = parseCommandArgs("check", argv, {
      device: { type: "string" },
      opt: { type: "string", multiple: true },
      only: { type: "string", multiple: true },
      list: { type: "boolean", default: false },
      verbose: { type: "boolean", short: "v", default: false },
      "log-level": { type: "string", default: "silent" },
      help: { type: "boolean", short: "h", default: false },
    });
    if (values.help) {
      io.out(CHECK_USAGE);
      return 0;
    }
    if (values.list) {
      const width = Math.max(...CHECKS.map((c) => c.id.length));
      for (const c of CHECKS) io.out(`${c.id.padEnd(width)}  ${c.title}`);
      return 0;
    }
    if (!values.device) throw new UsageError("check needs --device NAME|PATH", "check");
    const { factory } = await resolveDevice(values.device, "check", devices);
    const level = checkLevel(values["log-level"], "check");
    const only = values.only ?? [];
    const unknown = only.filter((id) => !CHECKS.some((c) => c.id === id));
    if (unknown.length > 0) throw new UsageError(`unknown check '${unknown[0]}'; known: ${CHECKS.map((c) => c.id).join(", ")}`, "check");
    const options = deviceOptionArgs(values.opt, "check");
    // bad options fail here, as a usage error; the device is let go at once
    await createDevice(factory, options, "check").dispose?.();

    io.out(`vfio-user-ts check: device '${factory.name}', ${describeOptions(options)}`);
    const log = level === "silent" ? silentLogger() : createLogger({ level, pretty: false });
    const report = await runCompliance(factory, {
      options,
      only,
      log,
      onResult: (r) => io.out(formatCheckResult(r, values.verbose)),
    });
    const failed = report.results.filter((r) => !r.passed);
    io.out(`${report.results.length - failed.length} passed, ${failed.length} failed`);
    if (failed.length > 0) io.out(`FAILED: ${failed.map((r) => r.id).join(", ")}`);
    return failed.length === 0 ? 0 : 1;
  } catch (err) {
    if (err instanceof UsageError) {
      for (const line of err.lines()) io.err(line);
      return 2;
    }
    throw err;
  }
}

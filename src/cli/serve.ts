/**
 * `vfio-user-ts serve`: one device on a UNIX socket until SIGINT/SIGTERM
 * (exit 0, socket removed, the device disposed) or until stdout is closed
 * by its reader (`serve ... | head -2`: the same clean shutdown).
 */
import { existsSync, statSync } from "node:fs";
import path from "node:path";
import { createLogger } from "../log.ts";
import { VfioUserServer } from "../server/server.ts";
import { createDevice, resolveDevice } from "./device-module.ts";
import { onInterrupt, onOutputClosed } from "./io.ts";
import { attachLine, shellQuote } from "./qemu.ts";
import { BENCH_OPTIONS, BENCH_USAGE, benchFromArgs } from "./serve-bench.ts";
import { checkLevel, deviceOptionArgs, parseCommandArgs, UsageError } from "./usage.ts";

export const SERVE_USAGE = `Usage: vfio-user-ts serve --socket PATH [options]

Options:
  --device NAME|PATH   device to serve (default: edu; see 'vfio-user-ts devices'),
                       or a module of yours: ./my-device.js (or .ts with tsx)
                       exporting a DeviceFactory as default or as 'factory'
  --socket PATH        UNIX socket to listen on (its directory must exist)
  --opt KEY=VALUE      device option, repeatable (e.g. --opt size=256M)
  --socket-mode MODE   permissions of the socket file, octal (default 0600)
  --log-level LEVEL    fatal|error|warn|info|debug|trace|silent (default info)
  --log-format FORMAT  pretty|json (default: pretty on a terminal, else json)
  --trace              log every message received and sent, with its fields
  --p2p                offer the P2P migration states (RUNNING_P2P, PRE_COPY_P2P)
${BENCH_USAGE}
  -h, --help           this text

Prints how to attach QEMU; 'vfio-user-ts qemu --socket PATH' starts it.`;

export async function serveMain(argv: string[]): Promise<number> {
  const { values } = parseCommandArgs("serve", argv, {
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
  });
  if (values.help) {
    console.log(SERVE_USAGE);
    return 0;
  }
  if (!values.socket) throw new UsageError("serve needs --socket PATH", "serve");
  const level = checkLevel(values["log-level"], "serve");
  const format = values["log-format"];
  if (format !== undefined && format !== "pretty" && format !== "json") throw new UsageError(`--log-format must be pretty or json, got '${format}'`, "serve");
  const modeText = values["socket-mode"]!;
  if (!/^0?[0-7]{3}$/.test(modeText)) throw new UsageError(`--socket-mode must be octal like 0600, got '${modeText}'`, "serve");
  const mode = Number.parseInt(modeText, 8);
  const socket = path.resolve(values.socket);
  const dir = path.dirname(socket);
  if (!existsSync(dir) || !statSync(dir).isDirectory()) throw new UsageError(`socket directory ${dir} does not exist`, "serve");
  const bench = benchFromArgs(values, (m) => new UsageError(m, "serve"));
  const options = deviceOptionArgs(values.opt, "serve");
  const { factory } = await resolveDevice(values.device!, "serve");

  const device = createDevice(factory, options, "serve");
  const log = createLogger({ level, pretty: format === undefined ? undefined : format === "pretty" });
  const server = new VfioUserServer({ device, log, trace: values.trace, migration: { p2p: values.p2p }, ...bench.serverOptions });
  bench.attach(server);
  try {
    server.listen(socket, mode);
  } catch (err) {
    await server.close();
    throw new UsageError(`cannot listen on ${socket}: ${(err as Error).message}`, "serve");
  }
  const what = `serving '${factory.name}' on ${socket}`;
  let stop!: (fields: Record<string, string>) => Promise<void>;
  const stopped = new Promise<void>((resolve) => {
    let closing: Promise<void> | null = null;
    stop = (fields) => {
      closing ??= (async () => {
        log.info({ ...fields, socket }, "shutting down");
        await server.close();
        bench.stopped();
        resolve();
      })();
      return closing;
    };
  });
  // a signal is serve's ordinary stop: the log says so (stderr stays JSON with --log-format json)
  const offInterrupt = onInterrupt(what, (signal) => stop({ signal }), 0);
  const offClosed = onOutputClosed(() => void stop({ reason: "stdout was closed" }));

  console.log(`vfio-user-ts: ${what}`);
  console.log("Attach QEMU 11.1 or newer with:\n");
  console.log(`  vfio-user-ts qemu --socket ${shellQuote(socket)}\n`);
  const attach = attachLine(socket);
  if (attach.line !== null) {
    console.log("or by hand:\n");
    console.log(attach.line);
  } else {
    console.log(`(${attach.why}.)`);
  }
  console.log("\nFor a scripted guest add '-machine accel=qtest -qtest unix:QTEST.sock'; a Linux guest: 'vfio-user-ts qemu --guest-kit'.");
  await stopped;
  offInterrupt();
  offClosed();
  return 0;
}

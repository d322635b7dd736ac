/**
 * npm run fuzz -- --messages N [--seed S] [--minutes M] [--probe-every K]
 *                 [--device edu|bigmem] [--opt K=V]... [--strict-fds]
 *
 * --strict-fds: the server's fds must be back to the start at every probe.
 *
 * Fuzzes a server in a child process (see fuzzer.ts). Prints one summary
 * line; exits 1 on a crash, a hang, or fds not back to where they started,
 * printing the seed and the message index of the failure (rerun with the
 * same --seed and --messages to replay it).
 */
import { parseArgs } from "node:util";
import { runFuzz, summary } from "./fuzzer.ts";

const { values } = parseArgs({
  options: {
    messages: { type: "string" },
    seed: { type: "string" },
    minutes: { type: "string" },
    "probe-every": { type: "string", default: "2000" },
    device: { type: "string", default: "edu" },
    "strict-fds": { type: "boolean", default: false },
    opt: { type: "string", multiple: true },
    help: { type: "boolean", short: "h", default: false },
  },
  strict: true,
});
if (values.help || (values.messages === undefined && values.minutes === undefined)) {
  console.log("Usage: npm run fuzz -- --messages N [--seed S] [--minutes M] [--probe-every K] [--device edu|bigmem] [--opt K=V]");
  process.exit(values.help ? 0 : 2);
}
const seed = values.seed !== undefined ? Number(values.seed) >>> 0 : (Date.now() ^ (process.pid << 16)) >>> 0;
const messages = values.messages !== undefined ? Number(values.messages) : Infinity;
const minutes = values.minutes !== undefined ? Number(values.minutes) : undefined;
if (!(messages > 0) || (minutes !== undefined && !(minutes > 0))) {
  console.error("fuzz: --messages and --minutes take positive numbers");
  process.exit(2);
}
console.error(`fuzz: seed ${seed}, ${Number.isFinite(messages) ? `${messages} messages` : "no message limit"}${minutes ? `, at most ${minutes} min` : ""}, device ${values.device}`);
const r = await runFuzz({
  seed,
  messages,
  timeLimitMs: minutes !== undefined ? minutes * 60_000 : undefined,
  probeEvery: Number(values["probe-every"]),
  strictFds: values["strict-fds"],
  device: values.device,
  deviceOpts: values.opt,
});
for (const f of r.failures) console.error(f);
const fdsFlat = r.fdsEnd === r.fdsStart;
if (!fdsFlat && r.crashes === 0) console.error(`fuzz: server fds not back to the start (${r.fdsStart} -> ${r.fdsEnd}) (seed ${seed})`);
console.log(summary(r));
process.exitCode = r.crashes > 0 || r.hangs > 0 || r.leaks > 0 || !fdsFlat ? 1 : 0;

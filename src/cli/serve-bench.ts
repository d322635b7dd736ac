/**
 * The test-bench options of `vfio-user-ts serve`: --client-report FILE (the
 * client conformance report, src/conformance) and --fault SPEC (faults on
 * demand, src/faults; the language is docs/faults.md). Kept apart from the
 * rest of serve's options so that serve itself only spreads them in.
 */
import { renameSync, writeFileSync } from "node:fs";
import type { ConformanceReport } from "../conformance/recorder.ts";
import { formatClientReport, formatConformanceReport } from "../conformance/report.ts";
import { FaultSyntaxError, parseFault, type Fault } from "../faults/language.ts";
import type { ServerOptions, VfioUserServer } from "../server/server.ts";

/** parseArgs descriptors of the bench options. */
export const BENCH_OPTIONS = {
  fault: { type: "string", multiple: true },
  "client-report": { type: "string" },
} as const;

export const BENCH_USAGE = `  --client-report FILE record each way the client departs from the spec (see
                       docs/qemu-client-conformance.md): a table on stderr when a
                       client leaves and when the server stops, JSON in FILE
  --fault SPEC         inject a fault, repeatable (docs/faults.md). SPEC is one
                       trigger, one action, options, comma-separated:
                         trigger  arc=FROM>TO | cmd=COMMAND | feature=FEATURE
                                  | after=N | state=STATE | irq=INTX|MSI|MSIX[:V]
                         action   errno=E | error | delay=MS | drop | short=BYTES
                                  | corrupt[=OFFSET] | size=BYTES | initial=BYTES
                                  | dirty=BYTES | stall=MS|forever
                         options  nth=N (1) | times=K|all (1) | in=STATE
                       e.g. arc=STOP_COPY>STOP,errno=EIO  cmd=DMA_MAP,nth=2,errno=ENOSPC
                            cmd=MIG_DATA_READ,in=STOP_COPY,corrupt  after=40,drop`;

export interface BenchValues {
  fault?: string[];
  "client-report"?: string;
}

export interface Bench {
  /** Spread into VfioUserServer's options. */
  readonly serverOptions: Pick<ServerOptions, "faults" | "conformance">;
  /** Call once the server exists (the report file is written from its recorder). */
  attach(server: VfioUserServer): void;
  /** The server has stopped: every client's table on stderr, the file written a last time. */
  stopped(): void;
}

/** The bench options as server options; a fault spec that does not parse is a usage error (`usage` makes it). */
export function benchFromArgs(values: BenchValues, usage: (message: string) => Error): Bench {
  const faults: Fault[] = [];
  for (const spec of values.fault ?? []) {
    try {
      faults.push(parseFault(spec));
    } catch (err) {
      if (err instanceof FaultSyntaxError) throw usage(`--fault '${spec}': ${err.message}`);
      throw err;
    }
  }
  const file = values["client-report"];
  let server: VfioUserServer | null = null;
  const write = (report: ConformanceReport) => {
    if (file === undefined) return;
    const tmp = `${file}.tmp-${process.pid}`;
    writeFileSync(tmp, `${JSON.stringify(report, null, 2)}\n`);
    renameSync(tmp, file);
  };
  return {
    serverOptions: {
      faults: faults.length > 0 ? faults : undefined,
      conformance:
        file === undefined
          ? undefined
          : {
              onClientDone: (r) => {
                process.stderr.write(`${formatClientReport(r).join("\n")}\n`);
                if (server?.conformance) write(server.conformance.report());
              },
            },
    },
    attach(s) {
      server = s;
      if (file !== undefined && s.conformance) write(s.conformance.report());
    },
    stopped() {
      if (file === undefined || !server?.conformance) return;
      const report = server.conformance.report();
      process.stderr.write(`${formatConformanceReport(report).join("\n")}\n`);
      write(report);
    },
  };
}

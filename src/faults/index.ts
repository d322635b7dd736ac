/** Faults on demand (serve --fault SPEC; VfioUserServer's `faults` option). The language: docs/faults.md. */
export { parseFault, FaultSyntaxError, MAX_DELAY_MS, type Fault, type FaultAction, type FaultTrigger } from "./language.ts";
export { ConnectionDrop, FaultSet, type CommandStep } from "./fault-set.ts";

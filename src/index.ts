/**
 * The package entry: the public device API and the server to run a device.
 * Breaking an exported type here is a semver-major change.
 */
export type {
  BarDefinition,
  CapabilitiesDefinition,
  Device,
  DeviceContext,
  DeviceFactory,
  DeviceIdentity,
  DeviceOptions,
  Dma,
  Doorbell,
  DmaSegment,
  DmaViews,
  InterruptMode,
  Interrupts,
  PrecopyMemory,
  RegionHandlers,
  StateValue,
  VendorCapability,
} from "./device/api.ts";

// Device options (`--opt key=value`): one schema, checked the same way for every device.
export {
  defineOptions,
  parseOptions,
  parseSize,
  formatSize,
  describeOptions,
  describeSpec,
  OptionError,
  type OptionSchema,
  type OptionSpec,
  type OptionValues,
  type IntegerOption,
  type BigintOption,
  type SizeOption,
  type BooleanOption,
  type StringOption,
} from "./device/options.ts";

// Saved-state helpers for saveState / loadState.
export { readState, StateReader, stateDifference, statesEqual, normalizeState, packState, unpackState } from "./device/state.ts";

// Running a device: the server and its logger.
export { VfioUserServer, type ServerOptions } from "./server/server.ts";
export { createLogger, silentLogger, type LogOptions } from "./log.ts";

// The test bench for VMM developers: the client conformance report (ServerOptions.conformance)
// and faults on demand (ServerOptions.faults; the language is docs/faults.md).
export { ConformanceRecorder, DEVIATIONS, formatClientReport, formatConformanceReport, type ClientReport, type ConformanceOptions, type ConformanceReport, type DeviationRecord } from "./conformance/index.ts";
export { FaultSyntaxError, parseFault, type Fault } from "./faults/index.ts";

// The compliance suite every device must pass (what `vfio-user-ts check` runs).
export {
  runCompliance,
  complianceCheckIds,
  formatCheckResult,
  formatComplianceReport,
  type CheckResult,
  type ComplianceOptions,
  type ComplianceReport,
} from "./compliance/index.ts";

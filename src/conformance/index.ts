/** The client conformance report (serve --client-report; VfioUserServer's `conformance` option). */
export { DEVIATIONS, isDeviationId, sectionOf, type DeviationId, type DeviationKind, type Severity } from "./catalogue.ts";
export {
  ClientConformance,
  ConformanceRecorder,
  INJECTED_FAULT,
  type ClientReport,
  type ConformanceOptions,
  type ConformanceReport,
  type DeviationRecord,
  type FirstSeen,
} from "./recorder.ts";
export { formatClientReport, formatConformanceReport } from "./report.ts";

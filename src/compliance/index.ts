/**
 * The device compliance suite as a library: what `vfio-user-ts check` runs,
 * for use in a device's own tests:
 *
 *     const report = await runCompliance(myFactory, { options: { size: "1M" } });
 *     expect(report.results.filter((r) => !r.passed)).toEqual([]);
 */
export {
  runCompliance,
  complianceCheckIds,
  formatCheckResult,
  formatComplianceReport,
  type CheckResult,
  type ComplianceOptions,
  type ComplianceReport,
} from "./runner.ts";
export { CHECKS, type Check, type CheckContext } from "./checks.ts";
export { DeviceUnderTest, exercise, configDifferences, memoryDifference, walkCapabilityList } from "./harness.ts";

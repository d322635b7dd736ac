import { availableParallelism } from "node:os";
import { defineConfig } from "vitest/config";

/**
 * Two groups, run one after the other (sequence.groupOrder):
 *
 * - "light": unit, component, compliance and the quick robustness files, in
 *   parallel (at least 2 workers);
 * - "heavy", after them, one file at a time: everything that burns CPU for
 *   long (real QEMU, Linux guests under TCG, the fuzz slice, the leak and
 *   resource checks, the bench-like CLI runs, npm pack/install, the CLI
 *   paths that spawn a process per case). None of them runs beside a
 *   timing-sensitive file, nor beside each other.
 *
 * A file filter (`npx vitest run test/e2e/x.test.ts`) picks from both.
 */
const HEAVY = [
  "test/e2e/**/*.test.ts",
  "test/compliance/tutorial-qemu.test.ts",
  "test/robustness/fuzz-slice.test.ts",
  "test/robustness/leak.test.ts",
  "test/robustness/resources.test.ts",
  "test/robustness/serve-bench-cli.test.ts",
  "test/package/**/*.test.ts",
  "test/cli/**/*.test.ts",
];

export default defineConfig({
  test: {
    testTimeout: 30_000,
    hookTimeout: 120_000,
    pool: "forks",
    projects: [
      {
        extends: true,
        test: {
          name: "light",
          include: ["test/**/*.test.ts"],
          exclude: HEAVY,
          maxWorkers: Math.max(2, availableParallelism() - 1),
          sequence: { groupOrder: 0 },
        },
      },
      {
        extends: true,
        test: {
          name: "heavy",
          include: HEAVY,
          maxWorkers: 1,
          fileParallelism: false,
          sequence: { groupOrder: 1 },
        },
      },
    ],
  },
});

/**
 * Which commands are legal when: a pure predicate, tested as a table.
 * Returns the error to reply with, or null when the command may run.
 */
import { Command, MigState } from "../../protocol/constants.ts";
import { VfioUserError, fail } from "../../protocol/errors.ts";

const SAVING_READABLE: ReadonlySet<number> = new Set([MigState.PRE_COPY, MigState.PRE_COPY_P2P, MigState.STOP_COPY]);
const PRECOPY: ReadonlySet<number> = new Set([MigState.PRE_COPY, MigState.PRE_COPY_P2P]);

export function commandAllowed(command: number, versionDone: boolean, migState: number): VfioUserError | null {
  // spec: "the initial client message is VFIO_USER_VERSION"
  if (!versionDone) return command === Command.VERSION ? null : fail.inval("VERSION must be negotiated first");
  switch (command) {
    case Command.VERSION:
      return fail.inval("VERSION was already negotiated");
    case Command.MIG_DATA_READ:
      // spec: reads only in the saving states that produce data
      return SAVING_READABLE.has(migState) ? null : fail.inval("MIG_DATA_READ outside PRE_COPY/STOP_COPY");
    case Command.MIG_DATA_WRITE:
      return migState === MigState.RESUMING ? null : fail.inval("MIG_DATA_WRITE outside RESUMING");
    case Command.MIG_GET_PRECOPY_INFO:
      return PRECOPY.has(migState) ? null : fail.inval("pre-copy info outside PRE_COPY");
    default:
      return null;
  }
}

/**
 * Which commands are legal when: a pure predicate, tested as a table.
 * Returns the error to reply with, or null when the command may run.
 */
import { Command, type MigState } from "../../protocol/constants.ts";
import { VfioUserError, fail } from "../../protocol/errors.ts";
import { allowsDataRead, allowsDataWrite, allowsPrecopyInfo } from "../migration/fsm.ts";

export function commandAllowed(command: number, versionDone: boolean, migState: MigState): VfioUserError | null {
  // spec: "the initial client message is VFIO_USER_VERSION"
  if (!versionDone) return command === Command.VERSION ? null : fail.inval("VERSION must be negotiated first").with({ rule: "version-missing" });
  switch (command) {
    case Command.VERSION:
      return fail.inval("VERSION was already negotiated").with({ rule: "version-repeated" });
    case Command.DMA_READ:
    case Command.DMA_WRITE:
      // spec: these go from the server to the client only
      return fail.notsup("DMA_READ/DMA_WRITE are server-to-client commands").with({ rule: "server-command" });
    case Command.MIG_DATA_READ:
      return allowsDataRead(migState) ? null : fail.inval("MIG_DATA_READ outside PRE_COPY/STOP_COPY").with({ rule: "mig-data-read-state" });
    case Command.MIG_DATA_WRITE:
      return allowsDataWrite(migState) ? null : fail.inval("MIG_DATA_WRITE outside RESUMING").with({ rule: "mig-data-write-state" });
    case Command.MIG_GET_PRECOPY_INFO:
      return allowsPrecopyInfo(migState) ? null : fail.inval("pre-copy info outside PRE_COPY").with({ rule: "precopy-info-state" });
    default:
      return null;
  }
}

/**
 * The commands that carry fds (spec: DMA_MAP "the file descriptor ... is
 * passed with the message"; SET_IRQS with DATA_EVENTFD). A message of any
 * other command that brings fds is malformed: it is refused with EINVAL (the
 * connection closes the fds), so a client that leaks fds into the wrong
 * messages learns of it instead of having them silently dropped.
 */
const FD_COMMANDS: ReadonlySet<number> = new Set([Command.DMA_MAP, Command.DEVICE_SET_IRQS]);

export function fdsAllowed(command: number, fdCount: number): VfioUserError | null {
  if (fdCount === 0 || FD_COMMANDS.has(command)) return null;
  return fail.inval(`${fdCount} fd(s) with a command that takes none`).with({ rule: "fds-unexpected" });
}

/**
 * `vfio-user-ts reset --socket PATH`: DEVICE_RESET to the device behind a
 * running server, as a VMM resets a device: the device returns to its
 * power-on state, and a device that a refused migration stream left in
 * ERROR is RUNNING again.
 */
import { MigState } from "../../protocol/constants.ts";
import { VfioUserError, errnoName } from "../../protocol/errors.ts";
import { stateName } from "../client/client.ts";
import { connectToServer } from "./connect.ts";
import { CommandError } from "./qemu.ts";
import { parseCommandArgs, UsageError } from "./usage.ts";

export const RESET_USAGE = `Usage: vfio-user-ts reset --socket PATH

Sends DEVICE_RESET to the device served on PATH: it returns to its power-on
state (config space too), and its migration state to RUNNING (after a refused
'snapshot restore --no-reset', for example). No other client may be attached.

Options:
  --socket PATH   the server's UNIX socket
  -h, --help      this text`;

export async function resetMain(argv: string[]): Promise<number> {
  const { values } = parseCommandArgs("reset", argv, {
    socket: { type: "string" },
    help: { type: "boolean", short: "h", default: false },
  });
  if (values.help) {
    console.log(RESET_USAGE);
    return 0;
  }
  if (!values.socket) throw new UsageError("reset needs --socket PATH", "reset");
  const client = await connectToServer(values.socket);
  try {
    // the migration state, when the device migrates: what the reset changed
    const before = await client.getMigState().catch(() => undefined);
    try {
      await client.reset();
    } catch (err) {
      throw new CommandError(`DEVICE_RESET failed: ${err instanceof VfioUserError ? errnoName(err.errno) : (err as Error).message}`);
    }
    const after = before === undefined ? undefined : await client.getMigState();
    const states = before === undefined ? "" : ` (migration state ${stateName(before)} -> ${stateName(after ?? MigState.RUNNING)})`;
    console.log(`reset the device at ${values.socket}: power-on state${states}`);
    return 0;
  } finally {
    client.close();
  }
}

/** A client connection to a running server for the CLI's one-shot commands (snapshot, reset). */
import { ConnectionClosedError, VfioUserClient } from "../client/client.ts";
import { CommandError } from "./qemu.ts";

/** Connects and negotiates; every failure is a CommandError that says what to check. */
export async function connectToServer(socket: string): Promise<VfioUserClient> {
  let client: VfioUserClient;
  try {
    client = await VfioUserClient.connect(socket, { connectTimeoutMs: 2000 });
  } catch (err) {
    throw new CommandError(`cannot connect to ${socket}: ${(err as Error).message} (is 'vfio-user-ts serve' running there?)`);
  }
  try {
    await client.negotiate();
  } catch (err) {
    client.close();
    if (err instanceof ConnectionClosedError) {
      throw new CommandError(`the server at ${socket} closed the connection: it serves one client at a time, is another one (QEMU?) attached?`);
    }
    throw new CommandError(`VERSION negotiation with ${socket} failed: ${(err as Error).message}`);
  }
  return client;
}

/**
 * A device on an in-process server in a temp directory, and a client that
 * negotiated with it, for component tests. `cleanups` gets what undoes it
 * (run them last-first).
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { VfioUserClient } from "../../src/client/client.ts";
import { VfioUserServer, type Device } from "../../src/index.ts";

export async function serveDevice(dev: Device, cleanups: (() => unknown)[]): Promise<{ client: VfioUserClient; server: VfioUserServer; sock: string }> {
  const dir = mkdtempSync(path.join(tmpdir(), "vfu-component-"));
  const server = new VfioUserServer({ device: dev });
  const sock = path.join(dir, "s.sock");
  server.listen(sock);
  const client = await VfioUserClient.connect(sock, { requestTimeoutMs: 5000 });
  await client.negotiate();
  cleanups.push(() => rmSync(dir, { recursive: true, force: true }), () => server.close(), () => client.close());
  return { client, server, sock };
}

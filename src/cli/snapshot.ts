/**
 * `vfio-user-ts snapshot save|restore`: a device's state to a file and back,
 * through the migration data stream of a running server.
 *
 *   save     RUNNING (or STOP) -> STOP_COPY, MIG_DATA_READ until empty into
 *            FILE (written as FILE.partial, renamed when complete), then back
 *            to the state it was in. The device is stopped while it saves.
 *   restore  -> RESUMING, FILE written with MIG_DATA_WRITE, RESUMING -> STOP
 *            (the server validates the whole stream there and applies it only
 *            if it is accepted), -> RUNNING.
 *
 * A refused stream (another device type or state version, a damaged file)
 * fails RESUMING -> STOP with EINVAL and the device enters ERROR, which VFIO
 * leaves only through DEVICE_RESET. restore therefore resets the device, so
 * it is RUNNING again in its power-on state, and exits 1 with the reason
 * (the server would reset a device left in ERROR anyway when the client
 * goes). The state the device had before the restore is gone: entering
 * RESUMING already promised to replace it.
 *
 * The file is the stream as the server produced it (see
 * src/migration/state-stream.ts); nothing is added around it.
 */
import { closeSync, openSync, readSync, renameSync, rmSync, writeSync, fstatSync } from "node:fs";
import { parseArgs } from "node:util";
import { Errno, MigState, type MigState as MigStateValue } from "../../protocol/constants.ts";
import { VfioUserError, errnoName } from "../../protocol/errors.ts";
import { ConnectionClosedError, stateName, VfioUserClient } from "../client/client.ts";
import { UsageError } from "./main.ts";

const CHUNK = 1 << 20;
const WRITE_WINDOW = 4;

/** A snapshot operation failed; `refused` when the device refused the stream. */
export class SnapshotError extends Error {
  constructor(
    message: string,
    readonly errno?: number,
    readonly refused = false,
    /** The device's migration state after the failure handling. */
    readonly deviceState?: MigStateValue,
  ) {
    super(message);
    this.name = "SnapshotError";
  }
}

export interface SnapshotResult {
  bytes: number;
  ms: number;
}

async function open(socket: string): Promise<VfioUserClient> {
  let client: VfioUserClient;
  try {
    client = await VfioUserClient.connect(socket, { connectTimeoutMs: 2000 });
  } catch (err) {
    throw new SnapshotError(`cannot connect to ${socket}: ${(err as Error).message}`);
  }
  try {
    await client.negotiate();
  } catch (err) {
    client.close();
    if (err instanceof ConnectionClosedError) {
      throw new SnapshotError(`the server at ${socket} closed the connection: it serves one client at a time, is another one attached?`);
    }
    throw new SnapshotError(`VERSION negotiation failed: ${(err as Error).message}`);
  }
  return client;
}

function describe(err: unknown): string {
  return err instanceof VfioUserError ? `${errnoName(err.errno)}` : (err as Error).message;
}

/** Saves the device state behind `socket` into `file`. */
export async function snapshotSave(socket: string, file: string): Promise<SnapshotResult> {
  const t0 = performance.now();
  const client = await open(socket);
  const partial = `${file}.partial`;
  let fd = -1;
  let entered = false;
  let before: MigStateValue = MigState.RUNNING;
  try {
    before = await client.getMigState();
    if (before !== MigState.RUNNING && before !== MigState.STOP) {
      throw new SnapshotError(`the device is in ${stateName(before)}; a snapshot is taken from RUNNING or STOP`);
    }
    fd = openSync(partial, "w", 0o600);
    entered = true;
    await client.setMigState(MigState.STOP_COPY);
    let bytes = 0;
    for (;;) {
      const data = await client.migDataRead(CHUNK);
      if (data.length === 0) break;
      writeSync(fd, data);
      bytes += data.length;
    }
    closeSync(fd);
    fd = -1;
    await client.setMigState(before);
    entered = false;
    renameSync(partial, file);
    return { bytes, ms: performance.now() - t0 };
  } catch (err) {
    if (fd >= 0) closeSync(fd);
    rmSync(partial, { force: true });
    let back = "";
    if (entered && !client.closed) {
      try {
        await client.setMigState(before);
        back = `; the device is back in ${stateName(before)}`;
      } catch (e) {
        back = `; returning the device to ${stateName(before)} failed: ${describe(e)}`;
      }
    }
    if (err instanceof SnapshotError) throw err;
    throw new SnapshotError(`saving failed: ${describe(err)}${back}`, err instanceof VfioUserError ? err.errno : undefined);
  } finally {
    client.close();
  }
}

/** Loads `file` into the device behind `socket` and runs it. */
export async function snapshotRestore(socket: string, file: string): Promise<SnapshotResult> {
  const t0 = performance.now();
  let fd: number;
  try {
    fd = openSync(file, "r");
  } catch (err) {
    throw new SnapshotError(`cannot open ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
  const size = fstatSync(fd).size;
  const client = await open(socket);
  let resuming = false;
  try {
    const state = await client.getMigState();
    if (state === MigState.ERROR) throw new SnapshotError("the device is in ERROR; reset it first (DEVICE_RESET)");
    await client.setMigState(MigState.RESUMING);
    resuming = true;
    // stream the file; a refused write stops the stream, the verdict comes with RESUMING -> STOP
    let writeError: unknown = null;
    const inflight = new Set<Promise<void>>();
    const buf = Buffer.allocUnsafe(CHUNK * (WRITE_WINDOW + 1));
    let slot = 0;
    for (let done = 0; done < size && writeError === null; ) {
      const chunk = buf.subarray(slot * CHUNK, (slot + 1) * CHUNK);
      slot = (slot + 1) % (WRITE_WINDOW + 1);
      const n = readSync(fd, chunk, 0, Math.min(CHUNK, size - done), done);
      if (n <= 0) break;
      done += n;
      const p: Promise<void> = client.migDataWrite(chunk.subarray(0, n)).then(
        () => void inflight.delete(p),
        (err: unknown) => {
          inflight.delete(p);
          writeError ??= err;
        },
      );
      inflight.add(p);
      if (inflight.size >= WRITE_WINDOW) await Promise.race(inflight);
    }
    await Promise.all([...inflight]);
    try {
      await client.setMigState(MigState.STOP);
    } catch (verdict) {
      if (verdict instanceof ConnectionClosedError) throw verdict;
      const errno = verdict instanceof VfioUserError ? verdict.errno : undefined;
      await client.reset();
      const after = await client.getMigState();
      const what = `the device was reset and is ${stateName(after)} in its power-on state`;
      const why = errno === Errno.EINVAL ? "the stream is not for this device (type or state version) or is damaged (the server logs which at debug level)" : describe(verdict);
      throw new SnapshotError(`the device refused ${file} (${errno !== undefined ? errnoName(errno) : "error"}): ${why}; ${what}`, errno, true, after);
    }
    resuming = false;
    await client.setMigState(MigState.RUNNING);
    return { bytes: size, ms: performance.now() - t0 };
  } catch (err) {
    if (err instanceof SnapshotError) throw err;
    const hint = resuming ? " (the device may be left in RESUMING or ERROR)" : "";
    throw new SnapshotError(`restoring failed: ${describe(err)}${hint}`, err instanceof VfioUserError ? err.errno : undefined);
  } finally {
    closeSync(fd);
    client.close();
  }
}

export const SNAPSHOT_USAGE = `Usage: vfio-user-ts snapshot save --socket PATH --file FILE
       vfio-user-ts snapshot restore --socket PATH --file FILE

save     stops the device, writes its migration stream to FILE, runs it again
restore  loads FILE into the device (RESUMING -> STOP) and runs it. A stream
         the device refuses (other device type or version, damaged) exits 1;
         the device is then reset to its power-on state and runs.

Options:
  --socket PATH   the server's UNIX socket (no other client may be attached)
  --file FILE     snapshot file
  -h, --help      this text`;

export async function snapshotMain(argv: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args: argv,
    options: {
      socket: { type: "string" },
      file: { type: "string" },
      help: { type: "boolean", short: "h", default: false },
    },
    strict: true,
    allowPositionals: true,
  });
  if (values.help) {
    console.log(SNAPSHOT_USAGE);
    return 0;
  }
  const [action, ...extra] = positionals;
  if (action !== "save" && action !== "restore") throw new UsageError(`snapshot needs 'save' or 'restore'${action ? `, got '${action}'` : ""}`);
  if (extra.length > 0) throw new UsageError(`unexpected argument '${extra[0]}'`);
  if (!values.socket) throw new UsageError(`snapshot ${action} needs --socket PATH`);
  if (!values.file) throw new UsageError(`snapshot ${action} needs --file FILE`);
  try {
    if (action === "save") {
      const r = await snapshotSave(values.socket, values.file);
      console.log(`saved ${r.bytes} bytes of device state to ${values.file} in ${r.ms.toFixed(0)} ms`);
    } else {
      const r = await snapshotRestore(values.socket, values.file);
      console.log(`restored ${r.bytes} bytes of device state from ${values.file} in ${r.ms.toFixed(0)} ms; the device is RUNNING`);
    }
    return 0;
  } catch (err) {
    if (!(err instanceof SnapshotError)) throw err;
    console.error(`vfio-user-ts: snapshot ${action}: ${err.message}`);
    return 1;
  }
}

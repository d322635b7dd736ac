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
import { Errno, MigState, type MigState as MigStateValue } from "../../protocol/constants.ts";
import { VfioUserError, errnoName } from "../../protocol/errors.ts";
import { ConnectionClosedError, stateName, type VfioUserClient } from "../client/client.ts";
import { RecordKind, StateStreamReader, type StreamHeader } from "../migration/state-stream.ts";
import { connectToServer } from "./connect.ts";
import { onInterrupt } from "./io.ts";
import { CommandError } from "./qemu.ts";
import { parseCommandArgs, UsageError } from "./usage.ts";

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
  try {
    return await connectToServer(socket);
  } catch (err) {
    throw new SnapshotError((err as Error).message);
  }
}

/** What a snapshot file holds, checked end to end without a device. */
export interface SnapshotInfo {
  header: StreamHeader;
  /** Records after the HEADER, END excluded. */
  records: number;
  bytes: number;
}

/**
 * Reads `file` through the stream decoder the server uses: magic, version,
 * every record's CRC, the END record and nothing after it. Throws
 * SnapshotError with the reason (`CRC mismatch in STATE record at offset
 * 41 ...`, `truncated inside MEMORY record ... (record 3)`, `empty`, `not a
 * state stream`, `N byte(s) after the END record`).
 */
export function inspectSnapshot(file: string): SnapshotInfo {
  let fd: number;
  try {
    fd = openSync(file, "r");
  } catch (err) {
    throw new SnapshotError(`cannot open ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
  let records = 0;
  // HEADER records may come through onRecord too: count the others
  const reader = new StateStreamReader({ onRecord: (r) => void (r.kind !== RecordKind.HEADER && records++) });
  const buf = Buffer.allocUnsafe(CHUNK);
  try {
    for (let at = 0; ; ) {
      const n = readSync(fd, buf, 0, CHUNK, at);
      if (n <= 0) break;
      at += n;
      reader.push(buf.subarray(0, n));
    }
    const decoded = reader.finish();
    return { header: decoded.header, records, bytes: decoded.byteLength };
  } catch (err) {
    if (err instanceof SnapshotError) throw err;
    const reason = (err as Error).message.replace(/^state stream: /, "");
    const what = /bad magic/.test(reason)
      ? `is not a vfio-user-ts state stream (${reason})`
      : reason === "empty stream"
        ? "is empty"
        : `is damaged: ${reason} (record ${records + (reader.header ? 2 : 1)}, counting the HEADER as 1)`;
    throw new SnapshotError(`${file} ${what}`, Errno.EINVAL, true);
  } finally {
    closeSync(fd);
  }
}

/**
 * The device's own stream header (type and state version): STOP_COPY, read
 * until the HEADER record is in, STOP. The device is stopped (as a restore
 * is about to replace its state anyway) and its stream abandoned.
 */
async function deviceHeader(client: VfioUserClient): Promise<StreamHeader> {
  await client.setMigState(MigState.STOP_COPY);
  const reader = new StateStreamReader();
  try {
    for (let read = 0; reader.header === undefined && read < 1 << 20; ) {
      const data = await client.migDataRead(4096);
      if (data.length === 0) break;
      read += data.length;
      reader.push(data);
    }
  } finally {
    await client.setMigState(MigState.STOP);
  }
  if (reader.header === undefined) throw new SnapshotError("the device's own stream has no HEADER record");
  return reader.header;
}

function label(h: StreamHeader): string {
  return `'${h.deviceType}' state version ${h.deviceVersion}`;
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

export interface RestoreOptions {
  /**
   * Check the file (inspectSnapshot) and the device's type and state version
   * before anything is sent, so a bad file leaves the device as it was
   * (default true). false sends the file as it is: the server's verdict.
   */
  check?: boolean;
}

/** Loads `file` into the device behind `socket` and runs it. */
export async function snapshotRestore(socket: string, file: string, opts: RestoreOptions = {}): Promise<SnapshotResult> {
  const t0 = performance.now();
  const checked = (opts.check ?? true) ? inspectSnapshot(file) : null;
  let fd: number;
  try {
    fd = openSync(file, "r");
  } catch (err) {
    throw new SnapshotError(`cannot open ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
  const size = fstatSync(fd).size;
  let client: VfioUserClient;
  try {
    client = await open(socket);
  } catch (err) {
    closeSync(fd);
    throw err;
  }
  let resuming = false;
  try {
    const state = await client.getMigState();
    if (state === MigState.ERROR) throw new SnapshotError(`the device is in ERROR; reset it first: vfio-user-ts reset --socket ${socket}`);
    if (checked) {
      const own = await deviceHeader(client);
      if (own.deviceType !== checked.header.deviceType || own.deviceVersion !== checked.header.deviceVersion) {
        await client.setMigState(state);
        throw new SnapshotError(
          `${file} holds state for ${label(checked.header)}; the device at ${socket} is ${label(own)}: nothing was sent, the device is ${stateName(state)} as before`,
          Errno.EINVAL,
          true,
          state,
        );
      }
    }
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
      const why =
        errno !== Errno.EINVAL
          ? describe(verdict)
          : checked
            ? `the file is a sound stream for this device type and version, so its loadState refused the state (the server logs why at debug level)`
            : "the stream is damaged or not for this device (type or state version); without --no-check the CLI says which";
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
       vfio-user-ts snapshot restore --socket PATH --file FILE [--no-check]
       vfio-user-ts snapshot inspect --file FILE

save     stops the device, writes its migration stream to FILE, runs it again
restore  checks FILE (every record's CRC, complete, nothing after its end) and
         that it is for the device's type and state version, then loads it
         (RESUMING -> STOP) and runs the device. A file that fails the checks
         is refused with its reason and the device is left as it was. A file
         the device itself refuses (its loadState) exits 1; the device is then
         reset to its power-on state and runs.
inspect  the checks alone: device type, state version, records, bytes

Options:
  --socket PATH   the server's UNIX socket (no other client may be attached)
  --file FILE     snapshot file
  --no-check      restore: send the file unchecked; the server's verdict decides
  -h, --help      this text`;

export async function snapshotMain(argv: string[]): Promise<number> {
  const { values, positionals } = parseCommandArgs(
    "snapshot",
    argv,
    {
      socket: { type: "string" },
      file: { type: "string" },
      "no-check": { type: "boolean", default: false },
      help: { type: "boolean", short: "h", default: false },
    },
    true,
  );
  if (values.help) {
    console.log(SNAPSHOT_USAGE);
    return 0;
  }
  const [action, ...extra] = positionals;
  if (action !== "save" && action !== "restore" && action !== "inspect") {
    throw new UsageError(`snapshot needs 'save', 'restore' or 'inspect'${action ? `, got '${action}'` : ""}`, "snapshot");
  }
  if (extra.length > 0) throw new UsageError(`unexpected argument '${extra[0]}'`, "snapshot");
  if (!values.socket && action !== "inspect") throw new UsageError(`snapshot ${action} needs --socket PATH`, "snapshot");
  if (!values.file) throw new UsageError(`snapshot ${action} needs --file FILE`, "snapshot");
  if (action !== "restore" && values["no-check"]) throw new UsageError("--no-check applies to restore only", "snapshot");
  const off = onInterrupt(`snapshot ${action} of ${values.file}`, () => rmSync(`${values.file}.partial`, { force: true }));
  try {
    if (action === "inspect") {
      const i = inspectSnapshot(values.file);
      const extraFields = Object.keys(i.header).filter((k) => k !== "deviceType" && k !== "deviceVersion");
      console.log(`${values.file}: device ${label(i.header)}, ${i.records} records, ${i.bytes} bytes, every CRC good${extraFields.length ? `; header also has ${extraFields.join(", ")}` : ""}`);
    } else if (action === "save") {
      const r = await snapshotSave(values.socket!, values.file);
      console.log(`saved ${r.bytes} bytes of device state to ${values.file} in ${r.ms.toFixed(0)} ms`);
    } else {
      const r = await snapshotRestore(values.socket!, values.file, { check: !values["no-check"] });
      console.log(`restored ${r.bytes} bytes of device state from ${values.file} in ${r.ms.toFixed(0)} ms; the device is RUNNING`);
    }
    return 0;
  } catch (err) {
    if (!(err instanceof SnapshotError)) throw err;
    throw new CommandError(`snapshot ${action}: ${err.message}`);
  } finally {
    off();
  }
}

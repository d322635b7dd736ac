/**
 * The CLI's process-level behaviour, the same for every command:
 *
 * - stdout or stderr closed by the reader (`vfio-user-ts serve | head -2`):
 *   EPIPE is no crash. Listeners registered with onOutputClosed run once
 *   (serve shuts down cleanly, removing its socket); further output is
 *   dropped.
 * - SIGINT / SIGTERM: one line on stderr says what was interrupted, the
 *   cleanups registered with onInterrupt run (servers stopped, temp
 *   directories removed), and the process exits 130 (SIGINT) or 143
 *   (SIGTERM). A second signal during cleanup exits at once.
 */

type Cleanup = (signal: NodeJS.Signals) => void | Promise<void>;

const cleanups: { what: string | (() => string); fn: Cleanup; exitCode: number | undefined }[] = [];
const closedListeners = new Set<() => void>();
let outputClosed = false;
let installed = false;
let interrupted = false;

/** Whether stdout (or stderr) was closed by its reader. */
export function isOutputClosed(): boolean {
  return outputClosed;
}

/** Runs `fn` once when stdout or stderr is closed; returns the unregister function. */
export function onOutputClosed(fn: () => void): () => void {
  closedListeners.add(fn);
  return () => void closedListeners.delete(fn);
}

/**
 * Registers what an interrupt must undo while `what` is going on (the
 * message names the most recent one); returns the unregister function.
 * `exitCode` replaces 130/143 when this is the most recent entry, and then
 * the cleanup says what happened itself (serve: a signal is its normal way
 * to stop, logged by the server, exit 0).
 */
export function onInterrupt(what: string | (() => string), fn: Cleanup, exitCode?: number): () => void {
  const entry = { what, fn, exitCode };
  cleanups.push(entry);
  return () => {
    const i = cleanups.indexOf(entry);
    if (i >= 0) cleanups.splice(i, 1);
  };
}

function closed(err: NodeJS.ErrnoException): void {
  if (err.code !== "EPIPE" && err.code !== "ERR_STREAM_DESTROYED") throw err;
  if (outputClosed) return;
  outputClosed = true;
  for (const fn of [...closedListeners]) fn();
}

function say(line: string): void {
  if (!outputClosed) process.stderr.write(`${line}\n`);
}

async function interrupt(signal: NodeJS.Signals): Promise<void> {
  if (interrupted) process.exit(signal === "SIGINT" ? 130 : 143); // a second signal: no more waiting
  interrupted = true;
  const pending = cleanups.splice(0).reverse();
  const code = pending[0]?.exitCode ?? (signal === "SIGINT" ? 130 : 143);
  const top = pending[0]?.what;
  const what = typeof top === "function" ? top() : top;
  if (pending[0]?.exitCode === undefined) say(`vfio-user-ts: interrupted (${signal})${what ? ` while ${what}` : ""}${pending.length > 0 ? "; cleaning up" : ""}`);
  const deadline = new Promise<void>((resolve) => setTimeout(resolve, 10_000).unref());
  for (const c of pending) {
    try {
      await Promise.race([c.fn(signal), deadline]);
    } catch (err) {
      say(`vfio-user-ts: cleanup failed: ${(err as Error).message}`);
    }
  }
  process.exit(code);
}

/** Installs the handlers (once per process; the bin calls it). */
export function installProcessHandlers(): void {
  if (installed) return;
  installed = true;
  process.stdout.on("error", closed);
  process.stderr.on("error", closed);
  for (const signal of ["SIGINT", "SIGTERM"] as const) process.on(signal, (s) => void interrupt(s));
}

/** Whether an interrupt is being handled (commands stop printing results). */
export function isInterrupted(): boolean {
  return interrupted;
}

/**
 * Typed loader for the vfio_native addon (src/transport/native/vfio_native.c),
 * built by the package's `install` script (`npm ci` runs it).
 *
 * Conventions of the addon: every call is synchronous; syscall failures come
 * back as a negative errno (use `errnoError` to turn one into an Error); only
 * wrong argument types throw. All fds it creates are close-on-exec; sockets
 * are non-blocking. Connected sockets (accept, connect) ask for a 768 KiB
 * SO_SNDBUF, which the kernel doubles (capped by net.core.wmem_max): a 1 MiB
 * reply then leaves in one sendmsg instead of five with a copy of the rest.
 */
import { createRequire } from "node:module";
import { getSystemErrorName } from "node:util";

/** A uv_poll_t on an fd. The callback runs on the event loop. */
export interface NativeWatcher {
  /** Poll for READABLE and/or WRITABLE (0 stops). Returns 0 or a negative errno. */
  start(events: number): number;
  stop(): void;
  /**
   * Stops polling and releases the callback; idempotent and safe inside the
   * callback. Close the watcher before closing its fd.
   */
  close(): void;
  /** Whether an active watcher keeps the event loop alive (default: it does). */
  ref(): void;
  unref(): void;
}

export interface NativeWatcherConstructor {
  /**
   * `events` is a mask of READABLE/WRITABLE that are ready; `status` is 0 or
   * a negative errno. An exception thrown by the callback becomes an
   * uncaught exception. Throws (code = errno name) if the fd cannot be polled.
   */
  new (fd: number, callback: (events: number, status: number) => void): NativeWatcher;
}

export interface NativeAddon {
  readonly READABLE: 1;
  readonly WRITABLE: 2;
  /** Most fds one sendmsg carries (SCM_MAX_FD). */
  readonly MAX_FDS: 253;
  readonly Watcher: NativeWatcherConstructor;

  /**
   * socket + bind + chmod(mode, when given, before listen so nobody connects
   * earlier) + listen. Returns the listening fd or -errno. On a failure after
   * bind the socket file is removed again.
   */
  listen(path: string, backlog: number, mode?: number): number;
  /** A connection's fd or -errno (-EAGAIN: none pending). */
  accept(fd: number): number;
  /**
   * Blocking connect, then the fd is made non-blocking. With
   * `nonblocking`, never waits: a server with a full backlog yields -EAGAIN.
   */
  connect(path: string, nonblocking?: boolean): number;
  /**
   * One recvmsg. Returns bytes read (0 = EOF) or -errno. fdsOut[0] = number
   * of fds received, fdsOut[1..] the fds (now owned by the caller); -1 when
   * fds were lost (MSG_CTRUNC or more than fdsOut can hold): the ones that
   * arrived were closed and the stream must be treated as broken.
   * fdsOut should have 1 + MAX_FDS entries.
   */
  recv(fd: number, buf: Uint8Array, fdsOut: Int32Array): number;
  /**
   * One sendmsg (MSG_NOSIGNAL) with an iovec per buffer (at most 64) and
   * `fds` on the first byte. Returns bytes sent (may be short) or -errno.
   */
  send(fd: number, bufs: readonly Uint8Array[], fds: Int32Array | null): number;
  close(fd: number): number;
  /** fcntl(F_DUPFD_CLOEXEC). */
  dup(fd: number): number;
  /**
   * O_NONBLOCK on (true) or off; 0 or -errno. The flag belongs to the open
   * file description: a received fd shares it with its sender.
   */
  setNonblocking(fd: number, on: boolean): number;
  /** CRC-32C of data continuing from crc (default 0); hardware-accelerated where the CPU has SSE4.2. */
  crc32c(data: Uint8Array, crc?: number): number;
  /** The same with the portable byte-wise table (what CPUs without SSE4.2 run); for tests. */
  crc32cPortable(data: Uint8Array, crc?: number): number;
  /** memfd_create(MFD_CLOEXEC) + ftruncate(size). */
  memfdCreate(name: string, size: bigint): number;
  /** EFD_CLOEXEC | EFD_NONBLOCK are always added to flags. */
  eventfd(initval: number, flags: number): number;
  /** st_size, or -errno as a negative bigint. */
  fstatSize(fd: number): bigint;
  /**
   * MAP_SHARED mapping of [offset, offset + length) (offset need not be page
   * aligned; length 1 .. 4 GiB) as an external ArrayBuffer, or -errno.
   * Writing to a read-only mapping is a SIGSEGV.
   */
  mmap(fd: number, offset: bigint, length: number | bigint, writable: boolean): ArrayBuffer | number;
  /** Detaches the ArrayBuffer (views become empty), then munmaps. Idempotent. */
  munmap(ab: ArrayBuffer): number;
}

/**
 * Where `npm ci` (the install script) builds the addon: next to this file in
 * the sources, and from the compiled dist/src/transport/native.js in the
 * package, three levels up in the sources it was built from.
 */
const ADDON_BUILD = "native/build/Release/vfio_native.node";
const ADDON_PATH = import.meta.url.endsWith(".ts") ? `./${ADDON_BUILD}` : `../../../src/transport/${ADDON_BUILD}`;

function load(): NativeAddon {
  const require = createRequire(import.meta.url);
  try {
    return require(ADDON_PATH) as NativeAddon;
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === "MODULE_NOT_FOUND" || code === "ERR_DLOPEN_FAILED") {
      const e = new Error(
        `vfio-user-ts: the native addon ${new URL(ADDON_PATH, import.meta.url).pathname} is missing or ` +
          `cannot be loaded (${(err as Error).message.split("\n")[0]}). Run \`npm ci\` (or ` +
          "`npm run install`) in the project root to build it; it needs a C compiler, make, python3 " +
          "and the Node headers (set npm_config_nodedir=/usr when offline).",
        { cause: err },
      );
      (e as NodeJS.ErrnoException).code = "ERR_VFIO_NATIVE_MISSING";
      throw e;
    }
    throw err;
  }
}

export const native: NativeAddon = load();

/** An Error for a negative errno returned by the addon (code, errno, syscall like Node's). */
export function errnoError(negErrno: number, syscall: string, path?: string): NodeJS.ErrnoException {
  let code: string;
  try {
    code = getSystemErrorName(negErrno);
  } catch {
    code = `E${-negErrno}`;
  }
  const e: NodeJS.ErrnoException = new Error(`${syscall} ${code}${path !== undefined ? ` ${path}` : ""}`);
  e.code = code;
  e.errno = negErrno;
  e.syscall = syscall;
  if (path !== undefined) e.path = path;
  return e;
}

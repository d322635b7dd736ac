/**
 * The disk behind the device: a raw image file read and written at
 * positions, off the event loop (libuv's thread pool: fs.readv / fs.writev /
 * fs.fdatasync on the fd), straight into and out of guest memory when the
 * device has zero-copy views of it.
 *
 * Opening happens once, when the device is created (a clear error for a
 * missing file or a bad size before anything is served): `file=PATH` opens
 * an image (created with `size=` if absent); without a path, a scratch file
 * of `size=` is made in the temp directory and unlinked at once, so it
 * vanishes with the process.
 */
import fs from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";

export interface BlockFileOptions {
  /** Image path; absent: an anonymous scratch file. */
  path?: string;
  /** Size in bytes to create the image (or the scratch file) with. */
  size?: bigint;
  readonly: boolean;
}

/** Positioned I/O on a raw image. */
export class BlockFile {
  /** Bytes of the image when it was opened. */
  readonly size: bigint;
  readonly readonly: boolean;
  /** The path given, or a description of the scratch file. */
  readonly label: string;
  private fd: number;

  private constructor(fd: number, size: bigint, readonly_: boolean, label: string) {
    this.fd = fd;
    this.size = size;
    this.readonly = readonly_;
    this.label = label;
  }

  static open(o: BlockFileOptions): BlockFile {
    if (o.path === undefined) {
      const size = o.size ?? 16n << 20n;
      const p = path.join(tmpdir(), `vfio-user-virtio-blk-${process.pid}-${Math.random().toString(36).slice(2)}.img`);
      const fd = fs.openSync(p, "wx+", 0o600);
      fs.unlinkSync(p);
      fs.ftruncateSync(fd, Number(size));
      return new BlockFile(fd, size, o.readonly, `scratch (${size} bytes, unlinked)`);
    }
    const exists = fs.existsSync(o.path);
    if (!exists && o.size === undefined) throw new Error(`virtio-blk: ${o.path} does not exist (give size= to create it)`);
    if (!exists && o.readonly) throw new Error(`virtio-blk: ${o.path} does not exist, and readonly=on cannot create it`);
    const fd = fs.openSync(o.path, exists ? (o.readonly ? "r" : "r+") : "wx+", 0o644);
    try {
      const st = fs.fstatSync(fd, { bigint: true });
      if (!st.isFile()) throw new Error(`virtio-blk: ${o.path} is not a regular file`);
      let size = st.size;
      if (!exists) {
        fs.ftruncateSync(fd, Number(o.size));
        size = o.size!;
      } else if (o.size !== undefined && o.size !== size) {
        throw new Error(`virtio-blk: ${o.path} exists with ${size} bytes, not the size=${o.size} given (leave size= out to use it as it is)`);
      }
      return new BlockFile(fd, size, o.readonly, o.path);
    } catch (err) {
      fs.closeSync(fd);
      throw err;
    }
  }

  /** Fills `buffers` in order from `position` (a short read past the end is an error). */
  async read(buffers: readonly Buffer[], position: number): Promise<void> {
    await this.transfer(buffers, position, "read");
  }

  /** Writes `buffers` in order at `position`. */
  async write(buffers: readonly Buffer[], position: number): Promise<void> {
    if (this.readonly) throw new Error("virtio-blk: the image is read-only");
    await this.transfer(buffers, position, "write");
  }

  /** fdatasync: what was written is on stable storage. */
  flush(): Promise<void> {
    if (this.readonly) return Promise.resolve();
    const fd = this.fd;
    return new Promise((resolve, reject) => fs.fdatasync(fd, (err) => (err ? reject(err) : resolve())));
  }

  /** Flushes (when writable) and closes; idempotent. */
  async close(): Promise<void> {
    const fd = this.fd;
    if (fd < 0) return;
    this.fd = -1;
    try {
      if (!this.readonly) await new Promise<void>((resolve, reject) => fs.fdatasync(fd, (err) => (err ? reject(err) : resolve())));
    } finally {
      await new Promise<void>((resolve) => fs.close(fd, () => resolve()));
    }
  }

  /** readv/writev until every byte moved (they may be partial; at most IOV_MAX buffers a call). */
  private async transfer(buffers: readonly Buffer[], position: number, dir: "read" | "write"): Promise<void> {
    if (this.fd < 0) throw new Error("virtio-blk: the image is closed");
    let list = buffers.filter((b) => b.length > 0);
    let pos = position;
    while (list.length > 0) {
      const batch = list.length > IOV_MAX ? list.slice(0, IOV_MAX) : list;
      const n = await this.once(batch, pos, dir);
      if (n === 0) throw new Error(`virtio-blk: ${dir} at ${pos} moved nothing (past the end of ${this.label}?)`);
      pos += n;
      // drop what moved; a buffer moved in part continues from where it stopped
      let left = n;
      let i = 0;
      while (i < list.length && left >= list[i]!.length) left -= list[i++]!.length;
      list = list.slice(i);
      if (left > 0) list[0] = list[0]!.subarray(left);
    }
  }

  private once(buffers: readonly Buffer[], position: number, dir: "read" | "write"): Promise<number> {
    const fd = this.fd;
    return new Promise((resolve, reject) => {
      const done = (err: NodeJS.ErrnoException | null, n: number) => (err ? reject(err) : resolve(n));
      if (dir === "read") fs.readv(fd, buffers, position, done);
      else fs.writev(fd, buffers, position, done);
    });
  }
}

/** Linux's IOV_MAX: the most buffers one readv/writev takes. */
const IOV_MAX = 1024;

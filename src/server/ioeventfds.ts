/**
 * Doorbells served as ioeventfds (GET_REGION_IO_FDS): one eventfd per
 * doorbell of a region, made the first time a client asks for that region
 * and watched on the event loop; a signal rings the doorbell. The client
 * (KVM) decides which guest writes go to the fd; the rest keep coming as
 * REGION_WRITE, so the device's write handler stays the fallback.
 *
 * The fds belong to the client connection: released (watchers closed, fds
 * closed) when it goes, like DMA regions and interrupt eventfds.
 */
import { readSync } from "node:fs";
import type { Logger } from "pino";
import type { Doorbell } from "../device/api.ts";
import { errnoError, native, type NativeWatcher } from "../transport/native.ts";

interface Bell {
  readonly fd: number;
  readonly watcher: NativeWatcher;
}

export class IoEventFds {
  private readonly regions = new Map<number, Bell[]>();
  private readonly counter = Buffer.alloc(8);
  /** Rings delivered through eventfds, for tests and logs. */
  rings = 0;

  constructor(private readonly log: Logger) {}

  /**
   * The eventfds of region `index`'s doorbells, in the doorbells' order
   * (created and watched on first use; the same fds after that). The caller
   * sends copies: these stay ours.
   */
  fdsFor(index: number, doorbells: readonly Doorbell[]): number[] {
    let bells = this.regions.get(index);
    if (!bells) {
      bells = [];
      try {
        for (const d of doorbells) bells.push(this.watch(d, index));
      } catch (err) {
        for (const b of bells) this.close(b);
        throw err;
      }
      this.regions.set(index, bells);
    }
    return bells.map((b) => b.fd);
  }

  /** The client is gone: stop watching and close every fd. */
  releaseAll(): void {
    for (const bells of this.regions.values()) for (const b of bells) this.close(b);
    this.regions.clear();
  }

  private watch(d: Doorbell, region: number): Bell {
    const fd = native.eventfd(0, 0);
    if (fd < 0) throw errnoError(fd, "eventfd");
    try {
      const watcher = new native.Watcher(fd, (_events, status) => {
        if (status < 0) {
          this.log.warn({ region, offset: d.offset, errno: status }, "ioeventfd poll failed");
          return;
        }
        if (!this.drain(fd)) return;
        this.rings++;
        d.ring();
      });
      const rc = watcher.start(native.READABLE);
      if (rc < 0) {
        watcher.close();
        throw errnoError(rc, "uv_poll_start");
      }
      // a doorbell alone does not keep the process alive
      watcher.unref();
      return { fd, watcher };
    } catch (err) {
      native.close(fd);
      throw err;
    }
  }

  /** Reads (and so resets) the eventfd counter; false when there was nothing. */
  private drain(fd: number): boolean {
    try {
      return readSync(fd, this.counter, 0, 8, null) === 8;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "EAGAIN") return false;
      throw err;
    }
  }

  private close(b: Bell): void {
    b.watcher.close();
    native.close(b.fd);
  }
}

/**
 * Doorbells as ioeventfds: a device declares doorbells in a BAR, the client
 * asks GET_REGION_IO_FDS and gets one eventfd per doorbell; a signal on it
 * rings the doorbell without a message, while ordinary REGION_WRITEs keep
 * reaching the BAR's write handler (the fallback QEMU 11.1.3 uses: it never
 * asks for these fds). The fds are the connection's: gone with the client.
 */
import { writeSync } from "node:fs";
import { afterEach, describe, expect, it } from "vitest";
import { serveDevice } from "./serve-device.ts";
import { Command, IoFdType, IoeventfdFlags, MessageSize } from "../../protocol/constants.ts";
import { decodeDeviceGetRegionIoFdsReply, encodeDeviceGetRegionIoFdsRequest } from "../../protocol/messages/device-get-region-io-fds.ts";
import { closeFd, VfioUserClient } from "../../src/client/client.ts";
import type { BarDefinition, Device } from "../../src/index.ts";

class BellDevice implements Device {
  readonly type = "bells";
  readonly stateVersion = 1;
  readonly identity = { vendorId: 0x1234, deviceId: 0xbe11, classCode: 0xff0000 };
  readonly rings = { a: 0, b: 0 };
  readonly writes: string[] = [];
  readonly bars: readonly BarDefinition[] = [
    {
      index: 0,
      size: 0x1000n,
      kind: "mem32",
      read: (_o, d) => void d.fill(0),
      write: (o, d) => void this.writes.push(`${o}:${d.toString("hex")}`),
      doorbells: [
        { offset: 0x10, size: 4, ring: () => void this.rings.a++ },
        { offset: 0x14, size: 2, datamatch: 3n, ring: () => void this.rings.b++ },
      ],
    },
    { index: 1, size: 0x1000n, kind: "mem32", read: (_o, d) => void d.fill(0), write: () => {} },
  ];
  attach(): void {}
  reset(): void {}
  saveState(): unknown {
    return {};
  }
  loadState(): void {}
}

const cleanups: (() => unknown)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

const serve = (dev: Device) => serveDevice(dev, cleanups);

const signal = (fd: number) => writeSync(fd, Buffer.from([1, 0, 0, 0, 0, 0, 0, 0]));

/** Waits (bounded) until `cond` holds. */
async function until(cond: () => boolean, what: string): Promise<void> {
  for (let i = 0; i < 200 && !cond(); i++) await new Promise((r) => setTimeout(r, 5));
  expect(cond(), what).toBe(true);
}

describe("GET_REGION_IO_FDS", () => {
  it("serves each doorbell as its own ioeventfd; a signal rings it, region writes still reach the handler", async () => {
    const dev = new BellDevice();
    const { client, server } = await serve(dev);
    const { reply, fds } = await client.regionIoFds(0);
    cleanups.push(() => fds.forEach(closeFd));
    expect(reply.count).toBe(2);
    expect(reply.argsz).toBe(MessageSize.REGION_IO_FDS_FIXED + 2 * MessageSize.SUB_REGION_IO_FD);
    expect(fds.length).toBe(2);
    expect(reply.sub_regions).toEqual([
      { type: IoFdType.IOEVENTFD, offset: 0x10n, size: 4n, fd_index: 0, flags: 0, datamatch: 0n },
      { type: IoFdType.IOEVENTFD, offset: 0x14n, size: 2n, fd_index: 1, flags: IoeventfdFlags.DATAMATCH, datamatch: 3n },
    ]);
    signal(fds[0]!);
    await until(() => dev.rings.a === 1, "doorbell a rang");
    signal(fds[1]!);
    signal(fds[1]!); // two signals before the loop looks: at least one ring
    await until(() => dev.rings.b >= 1, "doorbell b rang");
    expect(server.endpoint.ioEventFds.rings).toBe(dev.rings.a + dev.rings.b);
    // the fallback: a REGION_WRITE at the doorbell is an ordinary write
    await client.regionWrite(0, 0x10, Buffer.from([1, 0, 0, 0]));
    expect(dev.writes).toEqual(["16:01000000"]);
    expect(dev.rings.a).toBe(1);
    // asked again: the same eventfds (a signal on the new copy rings the same doorbell)
    const again = await client.regionIoFds(0);
    cleanups.push(() => again.fds.forEach(closeFd));
    signal(again.fds[0]!);
    await until(() => dev.rings.a === 2, "doorbell a rang through the second copy");
  });

  it("a short argsz gets the count and the full argsz, and no fds; a region without doorbells gets count 0", async () => {
    const { client } = await serve(new BellDevice());
    const frame = await client.request(Command.DEVICE_GET_REGION_IO_FDS, encodeDeviceGetRegionIoFdsRequest({ argsz: 16, index: 0 }), [], true);
    expect(frame.fds).toEqual([]);
    const r = decodeDeviceGetRegionIoFdsReply(frame.body);
    expect(r).toMatchObject({ count: 2, argsz: 96, sub_regions: [] });
    const none = await client.regionIoFds(1);
    expect(none.reply).toMatchObject({ count: 0, sub_regions: [] });
    expect(none.fds).toEqual([]);
    const config = await client.regionIoFds(7);
    expect(config.reply.count).toBe(0);
  });

  it("the fds are released with the client: a later signal rings nothing, the next client gets new ones", async () => {
    const dev = new BellDevice();
    const { client, server, sock } = await serve(dev);
    const { fds } = await client.regionIoFds(0);
    cleanups.push(() => fds.forEach(closeFd));
    client.close();
    await client.closedPromise;
    await until(() => server.endpoint.dma.socket === null, "server saw the client go");
    signal(fds[0]!);
    await new Promise((r) => setTimeout(r, 30));
    expect(dev.rings.a).toBe(0);
    const next = await VfioUserClient.connect(sock, { requestTimeoutMs: 5000 });
    cleanups.push(() => next.close());
    await next.negotiate();
    const second = await next.regionIoFds(0);
    cleanups.push(() => second.fds.forEach(closeFd));
    signal(second.fds[0]!);
    await until(() => dev.rings.a === 1, "the new client's doorbell rang");
  });
});

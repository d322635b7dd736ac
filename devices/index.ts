/** The devices shipped with the project, by the name `--device` takes. */
import type { DeviceFactory } from "../src/index.ts";
import { bigmemFactory } from "./bigmem/bigmem.ts";
import { eduFactory } from "./edu/edu.ts";
import { counterFactory } from "./tutorial/counter.ts";
import { virtioBlkFactory } from "./virtio-blk/virtio-blk.ts";

export const DEVICES: readonly DeviceFactory[] = [eduFactory, bigmemFactory, counterFactory, virtioBlkFactory];

export function findDevice(name: string): DeviceFactory | undefined {
  return DEVICES.find((d) => d.name === name);
}

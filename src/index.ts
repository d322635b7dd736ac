/**
 * The package entry: the public device API and the server to run a device.
 * Breaking an exported type here is a semver-major change.
 */
export type {
  BarDefinition,
  CapabilitiesDefinition,
  Device,
  DeviceContext,
  DeviceFactory,
  DeviceIdentity,
  DeviceOptions,
  Dma,
  InterruptMode,
  Interrupts,
  PrecopyMemory,
  RegionHandlers,
  StateValue,
} from "./device/api.ts";

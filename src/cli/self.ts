/**
 * Where this package's own files are, from the TypeScript sources
 * (src/cli/*.ts, in the repository) and from the compiled JavaScript
 * (dist/src/cli/*.js, in the installed package) alike.
 */
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";

const FROM_SOURCES = import.meta.url.endsWith(".ts");

/** The package root: the repository, or node_modules/vfio-user-ts. */
export const PACKAGE_ROOT = fileURLToPath(new URL(FROM_SOURCES ? "../../" : "../../../", import.meta.url)).replace(/\/$/, "");

/** The bin script (`node CLI_SCRIPT serve ...` starts a server the way a user does). */
export const CLI_SCRIPT = `${PACKAGE_ROOT}/src/cli/vfio-user-ts.mjs`;

/** The launcher of the Debian trixie root that holds QEMU 11.1.3 (docker/qemu-root.sh). */
export const QEMU_ROOT_SCRIPT = `${PACKAGE_ROOT}/docker/qemu-root.sh`;

/** Builds the Linux guest kit (docker/guest-kit.sh). */
export const GUEST_KIT_SCRIPT = `${PACKAGE_ROOT}/docker/guest-kit.sh`;

/** The package's version (package.json). */
export function packageVersion(): string {
  return (JSON.parse(readFileSync(`${PACKAGE_ROOT}/package.json`, "utf8")) as { version: string }).version;
}

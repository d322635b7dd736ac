#!/usr/bin/env bash
# The QEMU end-to-end tests (test/e2e), with QEMU required: a missing QEMU
# fails the run instead of skipping it. In the Docker image QEMU is native
# (VFIO_USER_QEMU=native from the Dockerfile); on a host it is the
# debootstrap root (docker/qemu-root.sh setup) or a QEMU >= 11.1 on PATH.
#
#   docker run --rm vfio-user-ts bash docker/run-e2e.sh [vitest options]
#   docker compose -f docker/compose.yaml run --rm e2e
set -euo pipefail
cd "$(dirname "$0")/.."
export VFIO_USER_REQUIRE_QEMU=${VFIO_USER_REQUIRE_QEMU:-1}
printf 'QEMU: '
node --import tsx docker/demo-qemu.ts check || { echo "QEMU is not usable here (see above)" >&2; exit 1; }
exec npx vitest run test/e2e "$@"

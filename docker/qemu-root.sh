#!/bin/sh
# QEMU 11.1.3 without a Docker engine: a Debian trixie root made with
# debootstrap, provisioned by the same docker/provision.sh the Dockerfile uses.
#
#   docker/qemu-root.sh setup          build the root once (root only, ~80 s), cached
#   docker/qemu-root.sh path           print the root's path
#   docker/qemu-root.sh exec [--bind HOST[:INNER]]... CMD ...
#                                      run CMD inside the root, with /proc and /dev
#                                      mounted in a private mount namespace; as a
#                                      user other than root, inside a user namespace
#                                      that maps that user to root (needs unprivileged
#                                      user namespaces, which Debian allows).
#                                      --bind mounts the host directory HOST on INNER
#                                      (default: the same path) inside the root, in that
#                                      namespace only; INNER must exist in the root.
#                                      `--bind /tmp` makes host sockets under /tmp
#                                      visible to QEMU at the same path.
#
# The root lives in $VFIO_USER_QEMU_ROOT (default /var/cache/vfio-user-ts/qemu-root).
# Paths under the root's /tmp are visible inside at the same path minus the
# root prefix, which is how tests share UNIX sockets with QEMU.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
ROOT=${VFIO_USER_QEMU_ROOT:-/var/cache/vfio-user-ts/qemu-root}
STAMP="$ROOT/.vfio-user-ts-ready"

setup() {
  if [ -f "$STAMP" ]; then
    cat "$STAMP"
    return 0
  fi
  if [ "$(id -u)" != 0 ]; then
    echo "qemu-root: building the root needs root (debootstrap, chroot)" >&2
    exit 1
  fi
  if ! command -v debootstrap >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  fi
  rm -rf "$ROOT.partial"
  mkdir -p "$(dirname "$ROOT")"
  debootstrap --variant=minbase trixie "$ROOT.partial" http://deb.debian.org/debian >/dev/null
  cp "$here/provision.sh" "$ROOT.partial/provision.sh"
  # provision inside the chroot: apt needs /proc and /dev
  unshare -m sh -c "mount --bind /proc '$ROOT.partial/proc' && mount --rbind /dev '$ROOT.partial/dev' && chroot '$ROOT.partial' /bin/sh /provision.sh" > "$ROOT.partial/.version"
  rm -rf "$ROOT"
  mv "$ROOT.partial" "$ROOT"
  mv "$ROOT/.version" "$STAMP"
  cat "$STAMP"
}

case "${1:-}" in
  setup) setup ;;
  path) echo "$ROOT" ;;
  exec)
    shift
    [ -f "$STAMP" ] || { echo "qemu-root: not set up; run: $0 setup" >&2; exit 1; }
    # binds are checked here and mounted inside the namespace
    n=0
    for arg in "$@"; do
      case "$n:$arg" in
        0:--bind) n=1 ;;
        1:*)
          host=${arg%%:*}; inner=${arg#*:}; [ "$inner" = "$arg" ] && inner=$host
          [ -d "$host" ] || { echo "qemu-root: --bind $arg: $host is not a directory" >&2; exit 2; }
          [ -d "$ROOT$inner" ] || { echo "qemu-root: --bind $arg: $inner does not exist in $ROOT" >&2; exit 2; }
          n=0 ;;
        *) break ;;
      esac
    done
    if [ "$(id -u)" = 0 ]; then ns=-m; else ns=-rm; fi
    # shellcheck disable=SC2016
    exec unshare $ns sh -c '
      root=$0
      mount --bind /proc "$root/proc" && mount --rbind /dev "$root/dev" || exit 1
      while [ "$1" = --bind ]; do
        host=${2%%:*}; inner=${2#*:}; [ "$inner" = "$2" ] && inner=$host
        mount --bind "$host" "$root$inner" || exit 1
        shift 2
      done
      exec chroot "$root" "$@"' "$ROOT" "$@"
    ;;
  *) echo "usage: $0 setup|path|exec [--bind HOST[:INNER]]... CMD..." >&2; exit 2 ;;
esac

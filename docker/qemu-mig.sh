#!/bin/sh
# The migrating QEMU client (test infrastructure, not part of the server):
# the vfio-user live-migration prototype built from Debian's QEMU 10.2.2
# source by qemu-mig/build.sh (see its README), installed into a copy of the
# project's trixie root so that root stays exactly as provision.sh made it.
#
#   docker/qemu-mig.sh setup [fixed|asfound|all]   build (root only; ~6 min per
#                                  build, cached: an unchanged patch set returns
#                                  at once); default: fixed
#   docker/qemu-mig.sh root        print the root's host path
#   docker/qemu-mig.sh bin BUILD   print the binary's path inside the root
#   docker/qemu-mig.sh status      say what is built, or why not (exit 1 if
#                                  the fixed build is missing)
#
# Builds:
#   fixed    patches/series as shipped: the prototype plus three client bug
#            fixes, in /opt/qemu-vfio-user-mig
#   asfound  the prototype alone (patch 0001), in
#            /opt/qemu-vfio-user-mig-asfound: the client as its authors left it
#
# Where the build scripts come from: $VFIO_USER_QEMU_MIG_SRC, else the first
# of ../shared/qemu-mig (next to the repository) and /work/shared/qemu-mig
# that exists. A clone without them cannot build the client: `setup` says so
# and exits 3, and the tests that need it report why they are skipped.
#
# The root: $VFIO_USER_QEMU_MIG_ROOT (default
# /var/cache/vfio-user-ts/qemu-mig-root), a `cp -a` of the project's root
# (docker/qemu-root.sh), remade when that root was rebuilt. The guest kit
# (docker/guest-kit.sh) is built into it as well.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
BASE_ROOT=${VFIO_USER_QEMU_ROOT:-/var/cache/vfio-user-ts/qemu-root}
ROOT=${VFIO_USER_QEMU_MIG_ROOT:-/var/cache/vfio-user-ts/qemu-mig-root}
PREFIX_FIXED=/opt/qemu-vfio-user-mig
PREFIX_ASFOUND=/opt/qemu-vfio-user-mig-asfound

src_dir() {
  if [ -n "${VFIO_USER_QEMU_MIG_SRC:-}" ]; then
    echo "$VFIO_USER_QEMU_MIG_SRC"
    return
  fi
  for d in "$repo/../shared/qemu-mig" /work/shared/qemu-mig; do
    if [ -f "$d/build.sh" ]; then
      (cd "$d" && pwd)
      return
    fi
  done
  echo ""
}

prefix_of() {
  case $1 in
    fixed) echo "$PREFIX_FIXED" ;;
    asfound) echo "$PREFIX_ASFOUND" ;;
    *) echo "qemu-mig: unknown build '$1' (fixed, asfound)" >&2; exit 2 ;;
  esac
}

# The root: a copy of the project's root, remade when that one changed.
ensure_root() {
  [ -f "$BASE_ROOT/.vfio-user-ts-ready" ] || sh "$here/qemu-root.sh" setup >/dev/null
  want=$(cat "$BASE_ROOT/.vfio-user-ts-ready")
  if [ -f "$ROOT/.vfio-user-ts-mig-base" ] && [ "$(cat "$ROOT/.vfio-user-ts-mig-base")" = "$want" ]; then
    return
  fi
  echo "qemu-mig: copying $BASE_ROOT to $ROOT"
  rm -rf "$ROOT.partial" "$ROOT"
  mkdir -p "$(dirname "$ROOT")"
  cp -a "$BASE_ROOT" "$ROOT.partial"
  # the copy's guest kit and sockets are its own
  rm -rf "$ROOT.partial/tmp/"* 2>/dev/null || true
  echo "$want" > "$ROOT.partial/.vfio-user-ts-mig-base"
  mv "$ROOT.partial" "$ROOT"
}

build_one() {
  b=$1
  src=$2
  prefix=$(prefix_of "$b")
  if [ "$b" = fixed ]; then
    sh "$src/build.sh" "$ROOT" "$prefix"
  else
    series=$(mktemp)
    # the prototype alone: the first patch of the shipped series
    grep -v '^[[:space:]]*\(#\|$\)' "$src/patches/series" | head -n 1 > "$series"
    SERIES=$series BUILD_DIR=/usr/src/qemu-vfio-user-mig-asfound sh "$src/build.sh" "$ROOT" "$prefix" || { rm -f "$series"; return 1; }
    rm -f "$series"
  fi
}

setup() {
  what=${1:-fixed}
  case $what in fixed|asfound|all) ;; *) echo "usage: $0 setup [fixed|asfound|all]" >&2; exit 2 ;; esac
  src=$(src_dir)
  if [ -z "$src" ] || [ ! -f "$src/build.sh" ]; then
    echo "qemu-mig: no build scripts (looked for ../shared/qemu-mig next to the repository and /work/shared/qemu-mig; set VFIO_USER_QEMU_MIG_SRC): the migrating QEMU cannot be built here" >&2
    exit 3
  fi
  [ "$(id -u)" = 0 ] || { echo "qemu-mig: building needs root (chroot, apt in the root)" >&2; exit 1; }
  ensure_root
  if [ "$what" = fixed ] || [ "$what" = all ]; then build_one fixed "$src"; fi
  if [ "$what" = asfound ] || [ "$what" = all ]; then build_one asfound "$src"; fi
  # the guest kit, for Linux guests migrated by this QEMU
  # its own kit, wherever VFIO_USER_GUEST_KIT points the Debian root's
  VFIO_USER_QEMU_ROOT=$ROOT VFIO_USER_QEMU=chroot VFIO_USER_GUEST_KIT= sh "$here/guest-kit.sh" setup >/dev/null
}

status() {
  ok=0
  for b in fixed asfound; do
    p=$(prefix_of "$b")
    if [ -x "$ROOT$p/bin/qemu-system-x86_64" ] && [ -f "$ROOT$p/.build-stamp" ]; then
      echo "$b: $ROOT$p/bin/qemu-system-x86_64 ($(cat "$ROOT$p/share/doc/qemu-vfio-user-mig/SOURCE" 2>/dev/null || echo built))"
    else
      echo "$b: not built (docker/qemu-mig.sh setup $b)"
      [ "$b" = fixed ] && ok=1
    fi
  done
  return $ok
}

case "${1:-}" in
  setup) shift; setup "$@" ;;
  root) echo "$ROOT" ;;
  bin) echo "$(prefix_of "${2:-fixed}")/bin/qemu-system-x86_64" ;;
  status) status ;;
  *) echo "usage: $0 setup [fixed|asfound|all] | root | bin BUILD | status" >&2; exit 2 ;;
esac

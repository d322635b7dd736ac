#!/bin/sh
# A small Linux guest for booting under QEMU/TCG in tests
# (test/e2e/linux-guest.test.ts): Debian trixie's cloud kernel and an
# initramfs base of busybox-static plus the uio and virtio_blk modules.
#
#   docker/guest-kit.sh setup    build the kit once (root only; needs network to
#                                deb.debian.org), cached; prints the stamp
#   docker/guest-kit.sh path     print the kit's directory (as the test sees it)
#
# The kit:
#   vmlinuz                  from linux-image-cloud-amd64 (trixie; PCI, MSI,
#                            8250 console, devtmpfs and /dev/mem built in)
#   config                   that kernel's config
#   initramfs-base.cpio.gz   /bin/busybox (busybox-static, with devmem and
#                            insmod), /bin/sh, /lib/modules/uio.ko,
#                            uio_pci_generic.ko and virtio_blk.ko
#                            (decompressed, for busybox insmod; the kernel
#                            has CONFIG_VIRTIO_PCI=y but CONFIG_VIRTIO_BLK=m);
#                            no /init and no device nodes: a test
#                            appends a second cpio with those (the kernel
#                            unpacks concatenated archives in order)
#   .ready                   the stamp: kit format, kernel and busybox versions;
#                            a kit whose stamp lacks the current format line
#                            is built again (KIT_FORMAT below, and
#                            test/e2e/harness/linux-guest.ts)
#
# Where it lives: with the debootstrap root (docker/qemu-root.sh) in
# $ROOT/opt/guest-kit, built inside the root with its apt; with a native QEMU
# (VFIO_USER_QEMU=native, the Docker image) in /var/cache/vfio-user-ts/guest-kit,
# built with the host's apt (a Debian trixie). $VFIO_USER_GUEST_KIT overrides
# the directory (native mode; in chroot mode it must be a path under the root).
# Mode selection follows test/e2e/harness/shared-dir.ts: VFIO_USER_QEMU=native|chroot,
# or (unset/auto) chroot when the root is set up, else native when
# qemu-system-x86_64 is on PATH.
#
# Kept apart from qemu-root.sh and provision.sh on purpose: the root stays
# exactly what provision.sh makes; this only downloads .debs and unpacks
# them with dpkg-deb (nothing is installed into the root).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
ROOT=${VFIO_USER_QEMU_ROOT:-/var/cache/vfio-user-ts/qemu-root}

mode() {
  case "${VFIO_USER_QEMU:-auto}" in
    native|chroot) echo "$VFIO_USER_QEMU" ;;
    auto|"")
      if [ -f "$ROOT/.vfio-user-ts-ready" ]; then echo chroot
      elif command -v qemu-system-x86_64 >/dev/null 2>&1; then echo native
      else echo chroot
      fi ;;
    *) echo "guest-kit: VFIO_USER_QEMU=$VFIO_USER_QEMU: expected native, chroot or auto" >&2; exit 2 ;;
  esac
}

MODE=$(mode)
if [ "$MODE" = chroot ]; then
  # the kit as seen inside the root, and from here
  case "${VFIO_USER_GUEST_KIT:-}" in
    "") INNER=/opt/guest-kit ;;
    "$ROOT"/*) INNER=${VFIO_USER_GUEST_KIT#"$ROOT"} ;;
    *) echo "guest-kit: VFIO_USER_GUEST_KIT=$VFIO_USER_GUEST_KIT is outside the QEMU root $ROOT" >&2; exit 2 ;;
  esac
  KIT=$ROOT$INNER
else
  KIT=${VFIO_USER_GUEST_KIT:-/var/cache/vfio-user-ts/guest-kit}
  INNER=$KIT
fi
STAMP="$KIT/.ready"
# bump when the kit's contents change, so existing kits are rebuilt
KIT_FORMAT="kit-format 2: uio uio_pci_generic virtio_blk"

# The build, run as root on a Debian trixie system (the root, or the host):
# $1 is the kit's path there, $2 the format line for the stamp. Everything
# happens in $1.partial, which replaces $1 only when complete.
# shellcheck disable=SC2016
BUILD='
set -eu
kit=$1
work=$kit.partial
rm -rf "$work"
mkdir -p "$work/debs" "$work/x" "$work/base/bin" "$work/base/lib/modules"
cd "$work/debs"
export DEBIAN_FRONTEND=noninteractive
# refresh the lists: the mirror drops superseded kernels at point releases
apt-get update -qq >/dev/null 2>&1 || echo "guest-kit: apt-get update failed; trying the lists there are" >&2
get() { apt-get download -qq -o APT::Sandbox::User=root "$@" >/dev/null; }
# from trixie itself, not trixie-backports (which has newer kernels)
get linux-image-cloud-amd64/trixie busybox-static/trixie
meta=$(ls linux-image-cloud-amd64_*.deb)
img=$(dpkg-deb -f "$meta" Depends | sed "s/[ ,|].*//")
case $img in linux-image-*) ;; *) echo "guest-kit: unexpected dependency of $meta: $img" >&2; exit 1 ;; esac
get "$img/trixie"
for deb in "$img"_*.deb busybox-static_*.deb; do dpkg-deb -x "$deb" ../x; done
cd "$work"
vmlinuz=$(ls x/boot/vmlinuz-* | head -n 1)
kver=${vmlinuz#x/boot/vmlinuz-}
bb=x/usr/bin/busybox
[ -x "$bb" ] || bb=x/bin/busybox
moddir=x/usr/lib/modules/$kver
[ -d "$moddir" ] || moddir=x/lib/modules/$kver
cp "$vmlinuz" vmlinuz
cp "x/boot/config-$kver" config
cp "$bb" base/bin/busybox
ln -s busybox base/bin/sh
MODULES="uio uio_pci_generic virtio_blk"
for m in $MODULES; do
  f=$(find "$moddir" -name "$m.ko*" | head -n 1)
  [ -n "$f" ] || { echo "guest-kit: $m not found in $moddir" >&2; exit 1; }
  case $f in
    *.xz) "$bb" unxz -c "$f" > "base/lib/modules/$m.ko" ;;
    *.gz) "$bb" gunzip -c "$f" > "base/lib/modules/$m.ko" ;;
    *.ko) cp "$f" "base/lib/modules/$m.ko" ;;
    *) echo "guest-kit: cannot decompress $f" >&2; exit 1 ;;
  esac
  # what it needs (its .modinfo "depends=") must be in the kit too: busybox insmod does not resolve
  deps=$(tr "\0" "\n" < "base/lib/modules/$m.ko" | grep "^depends=" | head -n 1 | cut -d= -f2 | tr "," " ")
  for d in $deps; do
    case " $MODULES " in *" $d "*) ;; *) echo "guest-kit: $m needs $d, which the kit lacks" >&2; exit 1 ;; esac
  done
done
(cd base && find . -mindepth 1 | sort | "../$bb" cpio -o -H newc -R 0:0 2>/dev/null) | gzip -9n > initramfs-base.cpio.gz
listing=$("$bb" zcat initramfs-base.cpio.gz | "$bb" cpio -t 2>/dev/null)
for f in bin/busybox bin/sh lib/modules/uio.ko lib/modules/uio_pci_generic.ko lib/modules/virtio_blk.ko; do
  echo "$listing" | grep -qx "$f" || { echo "guest-kit: $f missing from initramfs-base.cpio.gz" >&2; exit 1; }
done
bbver=$("$bb" 2>&1 | head -n 1 | sed "s/ multi-call.*//")
printf "%s\nlinux %s (%s), %s\n" "$2" "$kver" "${img#linux-image-}" "$bbver" > .ready.new
rm -rf debs x base
rm -rf "$kit"
mv "$work" "$kit"
mv "$kit/.ready.new" "$kit/.ready"
cat "$kit/.ready"
'

setup() {
  if [ -f "$STAMP" ] && grep -qxF "$KIT_FORMAT" "$STAMP"; then
    cat "$STAMP"
    return 0
  fi
  if [ "$(id -u)" != 0 ]; then
    echo "guest-kit: building the kit needs root (apt-get in the Debian root or system)" >&2
    exit 1
  fi
  if [ "$MODE" = chroot ]; then
    sh "$here/qemu-root.sh" exec sh -c "$BUILD" guest-kit "$INNER" "$KIT_FORMAT"
  else
    command -v apt-get >/dev/null 2>&1 && command -v dpkg-deb >/dev/null 2>&1 || {
      echo "guest-kit: native mode needs a Debian system (apt-get, dpkg-deb)" >&2
      exit 1
    }
    mkdir -p "$(dirname "$KIT")"
    sh -c "$BUILD" guest-kit "$INNER" "$KIT_FORMAT"
  fi
}

case "${1:-}" in
  setup) setup ;;
  path) echo "$KIT" ;;
  *) echo "usage: $0 setup|path" >&2; exit 2 ;;
esac

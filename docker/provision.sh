#!/bin/sh
# Provision a Debian trixie system with QEMU from trixie-backports.
# Used by both paths that give the project its QEMU: the Dockerfile (RUN) and
# the debootstrap root (docker/qemu-root.sh runs it inside the chroot), so the
# two environments cannot drift apart.
set -eu
export DEBIAN_FRONTEND=noninteractive
if ! grep -rqs 'trixie-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  echo 'deb http://deb.debian.org/debian trixie-backports main' > /etc/apt/sources.list.d/backports.list
fi
apt-get update -qq
apt-get install -y -qq --no-install-recommends -t trixie-backports qemu-system-x86 qemu-utils >/dev/null
qemu-system-x86_64 --version | head -n 1

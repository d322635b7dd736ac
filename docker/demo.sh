#!/usr/bin/env bash
# The demo (`npm run demo`): the edu device served by vfio-user-ts to QEMU
# 11.1's vfio-user-pci, with a scripted guest driving it, then a live
# migration of the device between two servers (`vfio-user-ts demo migrate`).
#
# QEMU comes from the debootstrap root of docker/qemu-root.sh (built here on
# first use when run as root, ~80 s), or runs natively when
# qemu-system-x86_64 >= 11.1 is on PATH (the Docker image; force either way
# with VFIO_USER_QEMU=native|chroot). Exit status 0 only if every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."

cli() { node src/cli/vfio-user-ts.mjs "$@"; }
guest() { node --import tsx docker/demo-qemu.ts "$@"; }
banner() { printf '\n==> %s\n' "$*"; }
die() { printf '\ndemo: %s\n' "$*" >&2; exit 1; }

t0=$(date +%s)
dir=""
server_pid=""
cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then kill -TERM "$server_pid" 2>/dev/null; wait "$server_pid" 2>/dev/null; fi
  [ -n "$dir" ] && rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- QEMU
banner "QEMU with vfio-user-pci"
qemu=$(guest check)
case $? in
  0) echo "$qemu" ;;
  3)
    echo "$qemu"
    if [ "$(id -u)" != 0 ]; then
      die "building the QEMU root needs root (debootstrap, chroot): run 'sudo bash docker/qemu-root.sh setup' once, then 'npm run demo' works as any user; or install QEMU >= 11.1 and set VFIO_USER_QEMU=native"
    fi
    echo "Building it once: Debian trixie (debootstrap) + QEMU from trixie-backports, about 80 s ..."
    bash docker/qemu-root.sh setup >/dev/null || die "docker/qemu-root.sh setup failed (see above)"
    qemu=$(guest check) || die "QEMU is still not usable after setup: $qemu"
    echo "$qemu"
    ;;
  *) die "QEMU is not usable: $qemu" ;;
esac

# ---------------------------------------------------------------- server
dir=$(guest shared-dir) || die "could not make a directory QEMU can reach"
sock="$dir/edu.sock"
banner "vfio-user-ts serve --device edu --socket $sock"
# not through cli(): a backgrounded function is a subshell, and $! must be node itself
node src/cli/vfio-user-ts.mjs serve --device edu --socket "$sock" --log-format json >"$dir/server.out" 2>"$dir/server.log" &
server_pid=$!
for _ in $(seq 200); do
  grep -q 'vfio-user-ts: serving' "$dir/server.out" 2>/dev/null && break
  kill -0 "$server_pid" 2>/dev/null || break
  sleep 0.1
done
if ! grep -q 'vfio-user-ts: serving' "$dir/server.out" 2>/dev/null; then
  cat "$dir/server.out" "$dir/server.log" >&2
  die "the server did not start"
fi
head -n 1 "$dir/server.out"
echo "(server pid $server_pid; its log is shown below if anything fails)"

# ---------------------------------------------------------------- guest
banner "A scripted guest drives the device through QEMU"
guest run --socket "$sock"
guest_status=$?

banner "Stop the server (SIGTERM)"
kill -TERM "$server_pid"
wait "$server_pid"
server_status=$?
server_pid=""
warnings=$(grep -c '"level":[4-6]0' "$dir/server.log")
echo "server exited with status $server_status; its log has $(wc -l <"$dir/server.log") lines, $warnings at warn level or above"
if [ "$guest_status" != 0 ] || [ "$server_status" != 0 ] || [ "$warnings" != 0 ]; then
  echo "--- server log (last 30 lines) ---"
  tail -n 30 "$dir/server.log"
  die "the QEMU part failed (guest status $guest_status, server status $server_status, $warnings warnings)"
fi

# ---------------------------------------------------------------- migration
banner "vfio-user-ts demo migrate: live migration of a device between two servers"
if ! cli --help 2>/dev/null | grep -Eq '^[[:space:]]+demo([[:space:]]|$)'; then
  die "this checkout's vfio-user-ts has no 'demo migrate' command yet (src/cli/demo-migrate.ts); the migration part cannot run"
fi
cli demo migrate
migrate_status=$?
[ "$migrate_status" = 0 ] || die "vfio-user-ts demo migrate failed (status $migrate_status)"

banner "Demo complete in $(($(date +%s) - t0)) s: every step passed"

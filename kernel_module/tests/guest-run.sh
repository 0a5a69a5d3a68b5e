#!/bin/sh
# SPDX-License-Identifier: GPL-2.0
#
# Runs inside the booted test kernel (tests/test_kernel.py starts it with
# virtme-ng): loads the shifter module, runs the guest test modules
# (tests.guest.guest_module and guest_kmod_resolver) with trial, unloads the
# module while a namespace records and holds live entries, and checks the
# kernel log (and, in a kernel built with kmemleak, asks it for leaks).
# The host's file system is read-only here and /tmp is writable.  Prints
# markers for the host to read:
#
#	GUEST-KERNEL <release>
#	INSMOD-OK | INSMOD-FAILED
#	TRIAL-EXIT <status>         after trial's own summary line
#	LIVE-ENTRIES <n>            entries held when the module is unloaded
#	RMMOD-OK | RMMOD-FAILED
#	KMEMLEAK <n> <m>            with kmemleak: objects reported leaked whose
#	                            allocation went through the module, and in all
#	DMESG-CLEAN | DMESG-DIRTY   then the whole log between
#	--- dmesg ---  and  --- end dmesg ---
#	GUEST-EXIT <status>
#
# Environment: SHIFTER_PYTHON, the Python with the project's packages
# (default: the work tree's .venv); SHIFTER_MODULE, the module to load
# (default: the one built in the work tree); SHIFTER_CHURN_SECONDS, how
# long the namespace churn test runs, and SHIFTER_GUEST_SLOW, how many
# times the tests' timeouts are stretched (both passed on to them);
# SHIFTER_GUEST_TESTS, the guest tests to run (default: all).  SHIFTER_HOSTFS_TAG and
# SHIFTER_HOSTFS_DIRS: when the host exports its root a second time as a
# 9p device with that tag, the script mounts it with caching and binds
# those directories (the work tree, the Python installation) from it.
# virtme-ng's own root mount has no cache, and Python's imports, a stat
# after a stat, are several times faster with one.

exec 2>&1

root=$(cd "$(dirname "$0")/../.." && pwd)
module="${SHIFTER_MODULE:-$root/kernel_module/shifter.ko}"
python="${SHIFTER_PYTHON:-$root/.venv/bin/python}"
status=0

echo "GUEST-KERNEL $(uname -r)"

. "$root/kernel_module/tests/hostfs.sh"
if mount_hostfs; then
	echo "HOSTFS-CACHED $SHIFTER_HOSTFS_DIRS"
fi

# Only this run's messages count: the boot's are not the module's doing.
dmesg --clear

kmemleak=/sys/kernel/debug/kmemleak
mountpoint -q /sys/kernel/debug || mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
if [ -w "$kmemleak" ]; then
	echo clear > "$kmemleak"
else
	kmemleak=
fi

# The module needs conntrack (built in, or a module to load first).
[ -d /sys/module/nf_conntrack ] || modprobe nf_conntrack

if insmod "$module"; then
	echo "INSMOD-OK"
else
	echo "INSMOD-FAILED"
	echo "GUEST-EXIT 1"
	exit 1
fi

cd "$root" || exit 1
# shellcheck disable=SC2086 # the test names are words
SHIFTER_GUEST=1 SHIFTER_MODULE="$module" PYTHONDONTWRITEBYTECODE=1 \
	"$python" -m twisted.trial --temp-directory=/tmp/_trial_guest \
		${SHIFTER_GUEST_TESTS:-tests.guest.guest_module tests.guest.guest_kmod_resolver}
trial=$?
echo "TRIAL-EXIT $trial"
[ "$trial" -eq 0 ] || status=1

# The tests may have reloaded the module: load it again if one left it out.
[ -d /sys/module/shifter ] || insmod "$module"

# Unload with entries in the table: a namespace that records, with live
# redirected connections, kept alive across the rmmod.
ip netns add shifter-unload
ip -n shifter-unload link set lo up
ip -n shifter-unload link add sh0 type veth peer name sh1
ip -n shifter-unload link set sh0 up
ip -n shifter-unload link set sh1 up
ip -n shifter-unload addr add 192.0.2.1/24 dev sh0
ip -n shifter-unload route add 203.0.113.0/24 dev sh0
ip netns exec shifter-unload iptables -t nat -A OUTPUT -p tcp -d 203.0.113.0/24 \
	--dport 443 -j REDIRECT --to-ports 12345
entries=$(ip netns exec shifter-unload env PYTHONDONTWRITEBYTECODE=1 \
	PYTHONPATH="$root" "$python" -c '
import socket
from tests.guest.support import ShifterClient
kmod = ShifterClient()
kmod.enable([443])
server = socket.create_server(("127.0.0.1", 12345), backlog=128)
clients = [socket.create_connection(("203.0.113.%d" % n, 443)) for n in range(1, 41)]
accepted = [server.accept()[0] for _ in clients]
print(kmod.stats()["entries"])
')
echo "LIVE-ENTRIES ${entries:-none}"
[ "${entries:-0}" -gt 0 ] 2>/dev/null || status=1

# Leaks the module made, found while its symbols are there to name it.
if [ -n "$kmemleak" ]; then
	echo scan > "$kmemleak"; sleep 6; echo scan > "$kmemleak"
	cat "$kmemleak" > /tmp/kmemleak-loaded.txt
fi

if rmmod shifter; then
	echo "RMMOD-OK"
else
	echo "RMMOD-FAILED"
	status=1
fi
ip netns del shifter-unload

if [ -n "$kmemleak" ]; then
	echo scan > "$kmemleak"; sleep 6; echo scan > "$kmemleak"
	cat "$kmemleak" > /tmp/kmemleak-unloaded.txt
	ours=$(awk '/^unreferenced object/ { n++; mark[n] = 0 } /\[shifter\]/ { mark[n] = 1 }
		END { c = 0; for (i in mark) c += mark[i]; print c }' /tmp/kmemleak-loaded.txt)
	all=$(grep -c '^unreferenced object' /tmp/kmemleak-unloaded.txt)
	echo "KMEMLEAK ${ours:-0} ${all:-0}"
	[ "${ours:-0}" -eq 0 ] || status=1
	echo "--- kmemleak ---"
	cat /tmp/kmemleak-loaded.txt /tmp/kmemleak-unloaded.txt | head -200
	echo "--- end kmemleak ---"
fi

if dmesg | grep -E -q 'WARNING|BUG|Oops|Call Trace|general protection|RCU stall|kmemleak: .*leak|refcount_t|list_(add|del) corruption|UBSAN|KASAN|possible circular|lockdep|suspicious RCU'; then
	echo "DMESG-DIRTY"
	status=1
else
	echo "DMESG-CLEAN"
fi
echo "--- dmesg ---"
dmesg
echo "--- end dmesg ---"

echo "GUEST-EXIT $status"
exit $status

#!/bin/sh
# Runs inside the kernel that demo/vmdemo.py boots with virtme-ng for
# `make run RESOLVER=kmod`: mounts the host's files with caching (as
# kernel_module/tests/guest-run.sh does: Python's imports are several times
# faster), loads the module, and runs the demo with the kmod resolver.  The
# host's file system is read-only here and /tmp is writable.  Prints
# markers for the host:
#
#	DEMO-BEGIN            the module is loaded; the demo's narration follows
#	DEMO-EXIT <status>    the demo's exit status
#
# Environment: SHIFTER_PYTHON, the Python with the project's packages;
# SHIFTER_MODULE, the module to load; SHIFTER_DEMO_OPTIONS, more options
# for demo.py (--ipv6, --name); SHIFTER_HOSTFS_TAG and SHIFTER_HOSTFS_DIRS,
# as for guest-run.sh.

exec 2>&1

root=$(cd "$(dirname "$0")/.." && pwd)

. "$root/kernel_module/tests/hostfs.sh"
mount_hostfs || true

# insmod loads no dependency: load what the module depends on first.
for dependency in $(modinfo -F depends "$SHIFTER_MODULE" | tr ',' ' '); do
	modprobe "$dependency"
done
if ! insmod "$SHIFTER_MODULE"; then
	echo "insmod $SHIFTER_MODULE failed"
	dmesg | tail -5
	echo "DEMO-EXIT 1"
	exit 1
fi
echo "DEMO-BEGIN"
said=$(dmesg | grep 'shifter: ' | grep -v -e taint -e verification | tail -1 | sed 's/^\[[^]]*\] //')
echo "The module is loaded (insmod $(basename "$SHIFTER_MODULE"))${said:+: $said}."
cd "$root" || exit 1
# shellcheck disable=SC2086 # the options are words
SHIFTER_DEMO_GUEST=1 PYTHONDONTWRITEBYTECODE=1 "$SHIFTER_PYTHON" demo/demo.py \
	--resolver kmod ${SHIFTER_DEMO_OPTIONS:-}
status=$?
echo "DEMO-EXIT $status"
exit $status

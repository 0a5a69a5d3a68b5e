# SPDX-License-Identifier: GPL-2.0
#
# Sourced by the scripts that run in a booted test kernel (guest-run.sh,
# demo/guest-demo.sh).  mount_hostfs: when the host exports its root a
# second time as a 9p device tagged SHIFTER_HOSTFS_TAG, mount it with
# caching and bind the directories in SHIFTER_HOSTFS_DIRS (the work tree,
# the Python installation) from it; virtme-ng's own root mount has no
# cache, and Python's imports, a stat after a stat, are several times
# faster with one.  Succeeds only when it mounted.

mount_hostfs() {
	[ -n "${SHIFTER_HOSTFS_TAG:-}" ] || return 1
	mkdir -p /run/shifter-hostfs
	mount -t 9p -o ro,trans=virtio,version=9p2000.L,cache=loose,msize=512000 \
		"$SHIFTER_HOSTFS_TAG" /run/shifter-hostfs || return 1
	for dir in ${SHIFTER_HOSTFS_DIRS:-}; do
		[ -d "$dir" ] && mount --bind "/run/shifter-hostfs$dir" "$dir"
	done
	return 0
}

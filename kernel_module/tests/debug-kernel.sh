#!/bin/sh
# SPDX-License-Identifier: GPL-2.0
#
# Builds, once, the debug kernel the guest suite runs in for
# `make test-kernel-debug`: Debian's linux-source-6.12 configured by
# virtme-ng (its small configuration for qemu) plus debug.config beside
# this script (lockdep, PROVE_RCU, KASAN, kmemleak, UBSAN, and the
# netfilter the suite needs, all built in), without debug info.  The tree
# is cached in CACHE/linux-source-6.12 with a stamp naming the Debian
# source version and a digest of the configuration and of this script;
# when they match, nothing is rebuilt.  Prints the tree's path last.
#
#	debug-kernel.sh CACHE
#
# Needs linux-source-6.12, flex, bison, bc, libelf-dev, libssl-dev and
# virtme-ng (vng) on the PATH.  A build takes the better part of an hour on
# two cores.

set -eu

cache=${1:?usage: debug-kernel.sh CACHE}
here=$(cd "$(dirname "$0")" && pwd)
tarball=/usr/src/linux-source-6.12.tar.xz
tree="$cache/linux-source-6.12"

version=$(dpkg-query -W -f='${Version}' linux-source-6.12)
digest=$(cat "$here/debug.config" "$0" | sha256sum | cut -c1-16)
key="linux-source-6.12 $version config $digest"

if [ -f "$tree/.shifter-built" ] && [ "$(cat "$tree/.shifter-built")" = "$key" ] &&
   [ -f "$tree/arch/x86/boot/bzImage" ]; then
	echo "debug kernel: cached ($key)" >&2
	echo "$tree"
	exit 0
fi

echo "debug kernel: building ($key) in $tree" >&2
rm -rf "$tree"
mkdir -p "$cache"
tar -C "$cache" -xJf "$tarball"
cd "$tree"
vng --kconfig --config "$here/debug.config" >&2
./scripts/config --disable DEBUG_INFO_DWARF_TOOLCHAIN_DEFAULT \
	--disable DEBUG_INFO_DWARF4 --disable DEBUG_INFO_DWARF5 \
	--enable DEBUG_INFO_NONE --disable DEBUG_INFO_BTF \
	--disable MODULE_SIG --disable WERROR
make olddefconfig >&2
for option in KASAN PROVE_LOCKING PROVE_RCU DEBUG_KMEMLEAK NF_NAT NFT_COMPAT; do
	grep -q "^CONFIG_$option=y" .config ||
		{ echo "debug kernel: CONFIG_$option did not stay on" >&2; exit 1; }
done
make -j"$(nproc)" bzImage modules >&2
echo "$key" > .shifter-built
echo "$tree"

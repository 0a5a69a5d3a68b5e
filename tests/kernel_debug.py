"""
The kernel module in a debug kernel (lockdep, PROVE_RCU, KASAN, kmemleak):
C{make test-kernel-debug} builds that kernel, caches it, names its tree in
C{SHIFTER_DEBUG_KERNEL} and runs this module by name.  The debug kernel
takes the better part of an hour to build on two cores, so C{make test}
does not collect this module (its name does not start with C{test_}).
"""

from __future__ import annotations

import os
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.test_kernel import Kernel, KernelTestsMixin, requireBootTools


class DebugKernelTests(KernelTestsMixin, SynchronousTestCase):
    """
    A kernel built from Debian's linux-source with lockdep, PROVE_RCU,
    KASAN and kmemleak (C{make test-kernel-debug} builds it, caches it and
    names its tree in C{SHIFTER_DEBUG_KERNEL}): the same suite, a longer
    namespace churn, and kmemleak asked for leaks.
    """

    series = "debug"

    def kernel(self) -> Kernel:
        tree = os.environ.get("SHIFTER_DEBUG_KERNEL")
        if not tree:
            raise SkipTest("runs the debug kernel that make test-kernel-debug builds")
        requireBootTools()
        release = (Path(tree) / "include" / "config" / "kernel.release").read_text().strip()
        # virtme-ng boots a built tree given as the tree itself.
        return Kernel(release, tree, tree, debug=True)

    def test_noLeaks(self) -> None:
        """
        kmemleak reports no object leaked through the module.
        """
        _, booted = self.booted()
        counts = booted.marker("KMEMLEAK")
        self.assertIsNotNone(counts, "no kmemleak report: is kmemleak built in and on?\n" + booted.tail())
        ours, _ = counts.split()
        self.assertEqual(ours, "0", booted.section("--- kmemleak ---", "--- end kmemleak ---"))

"""
Tests that run inside the booted test kernel, with the Shifter kernel
module loaded.  C{tests/test_kernel.py} boots the kernel and runs them
through C{kernel_module/tests/guest-run.sh}, which names the modules; they
are not called C{test_*}, so the host's own run of C{tests} does not
collect them (anywhere but the guest they would only skip).
"""

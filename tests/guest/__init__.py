"""
Tests that run inside the booted test kernel, with the Shifter kernel
module loaded.  C{tests/test_kernel.py} boots the kernel and runs them
through C{kernel_module/tests/guest-run.sh}; anywhere else they skip.
"""

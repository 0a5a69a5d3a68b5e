"""
Helpers shared by the tests: what an integration test needs from the host,
and how it says so when the host lacks it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from twisted.trial.unittest import SkipTest


def requireHost(*, root: bool = False, programs: tuple[str, ...] = ()) -> None:
    """
    Skip the calling test, with a plain reason, when this host cannot run it.

    Under CI (the C{CI} environment variable is set, as C{.ci/run} has it),
    CI machines have everything the tests need, so a missing requirement
    is an error there, not a skip: the test fails instead.
    """
    missing = []
    if root and os.geteuid() != 0:
        missing.append("root (network namespaces, netfilter rules)")
    for program in programs:
        if shutil.which(program) is None:
            missing.append(f"the program {program!r}")
    if not missing:
        return
    reason = "needs " + ", ".join(missing)
    if os.environ.get("CI"):
        raise AssertionError(f"{reason}, which CI must provide")
    raise SkipTest(reason)


def socketDirectory(test) -> Path:  # type: ignore[no-untyped-def]
    """
    A new directory for a UNIX socket, removed when C{test} ends.

    It is short, under the system's temporary directory, because a
    socket's path holds at most 107 bytes and a test's own directory (under
    the checkout's C{_trial_temp}) may not leave room.  Anyone may enter it,
    so that only the socket's own mode keeps other users out.
    """
    directory = Path(tempfile.mkdtemp(prefix="shifter-sock-"))
    os.chmod(directory, 0o755)
    test.addCleanup(shutil.rmtree, directory, ignore_errors=True)
    return directory


# The addresses tests give "this machine" when they build a factory or an
# owner by hand (the service reads the real ones before it listens).
TEST_LOCAL_ADDRESSES = frozenset({"192.0.2.254", "2001:db8:ffff::fe"})


def knowLocalAddresses(owner: object, addresses: frozenset[str] = TEST_LOCAL_ADDRESSES) -> None:
    """
    Give C{owner}'s destination checks (a factory's, or a test owner's
    C{proxyAddresses}) this machine's addresses, as the service's first
    read would.
    """
    owner.proxyAddresses.localAddresses = addresses  # type: ignore[attr-defined]


@contextmanager
def ntlmUsers(directory: Path, *users: str) -> Iterator[None]:
    """
    While in the block, pyspnego's NTLM acceptor checks responses against
    C{users} (C{DOMAIN:user:password} lines), in a file in C{directory}:
    it reads the file named by C{NTLM_USER_FILE} when it is built and
    again for each authenticate message.
    """
    userFile = directory / "ntlm-users"
    userFile.write_text("".join(user + "\n" for user in users))
    before = os.environ.get("NTLM_USER_FILE")
    os.environ["NTLM_USER_FILE"] = str(userFile)
    try:
        yield
    finally:
        if before is None:
            del os.environ["NTLM_USER_FILE"]
        else:
            os.environ["NTLM_USER_FILE"] = before

"""
Where a Python redirector's CPU goes: py-spy attached to the running
process, its collapsed stacks summed by function.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from bench.lab import PROJECT

_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def pySpy() -> str:
    local = PROJECT / ".venv" / "bin" / "py-spy"
    found = str(local) if local.exists() else shutil.which("py-spy")
    if found is None:
        raise RuntimeError("py-spy is not installed: .venv/bin/pip install py-spy")
    return found


class Profiler:
    """
    py-spy recording C{pid} (without pausing it) while the block runs, in
    py-spy's raw collapsed-stack format into C{output}.
    """

    def __init__(self, pid: int, output: Path, rate: int = 250) -> None:
        self.command = [pySpy(), "record", "--pid", str(pid), "--rate", str(rate), "--nonblocking",
                        "--format", "raw", "--output", str(output)]
        self.output = output

    def __enter__(self) -> "Profiler":
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        text=True)
        time.sleep(1.0)  # attached and sampling
        if self.process.poll() is not None:
            raise RuntimeError(f"py-spy failed: {self.process.stderr.read().strip()}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _short(path: str) -> str:
    for marker in ("site-packages/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return path.replace(str(PROJECT) + os.sep, "")


def summarize(raw: Path, top: int = 25) -> dict:
    """
    Sum py-spy's collapsed stacks: samples where each function was running
    (self) and where it was on the stack (inclusive), and self samples by
    file.
    """
    selfBy: dict[str, int] = {}
    inclusiveBy: dict[str, int] = {}
    fileBy: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        names = []
        for frame in stack.split(";"):
            m = _FRAME.match(frame)
            if m:
                names.append((f"{m['function']} ({_short(m['file'])})", _short(m["file"])))
            else:
                names.append((frame, frame))
        if not names:
            continue
        selfName, selfFile = names[-1]
        selfBy[selfName] = selfBy.get(selfName, 0) + n
        fileBy[selfFile] = fileBy.get(selfFile, 0) + n
        for name in {name for name, _ in names}:
            inclusiveBy[name] = inclusiveBy.get(name, 0) + n

    def ranked(counts: dict[str, int]) -> list[tuple[str, int, float]]:
        # Frames on (nearly) every stack -- twistd's main, the reactor's
        # loop -- say nothing; leave them out.
        items = sorted(((k, n) for k, n in counts.items() if n < 0.95 * total), key=lambda kv: -kv[1])[:top]
        return [(name, n, 100.0 * n / total if total else 0.0) for name, n in items]

    result = {
        "samples": total,
        "self": ranked(selfBy),
        "inclusive": ranked(inclusiveBy),
        "files": ranked(fileBy),
    }
    lines = []
    for title, key in (("self time by function", "self"), ("on the stack (inclusive; frames on over 95% of stacks left out)", "inclusive"),
                       ("self time by file", "files")):
        lines.append(f"  {title}:")
        lines.extend(f"    {pct:5.1f}%  {name}" for name, n, pct in result[key])
    result["text"] = "\n".join(lines)
    return result

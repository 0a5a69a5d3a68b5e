"""
Print trial's verdict as one plain line, C{N passed, N failed, N skipped},
from a trial log on standard input; exit non-zero when trial's own verdict
line is missing, so a run that tested nothing cannot pass.
"""

import re
import sys

verdict = None
for line in sys.stdin:
    if re.match(r"^(PASSED|FAILED) \(", line):
        verdict = line
if verdict is None:
    print("tests: no verdict from trial")
    sys.exit(1)
counts = {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", verdict)}
passed = counts.get("successes", 0) + counts.get("expectedFailures", 0)
failed = counts.get("failures", 0) + counts.get("errors", 0) + counts.get("unexpectedSuccesses", 0)
print(f"tests: {passed} passed, {failed} failed, {counts.get('skips', 0)} skipped")
sys.exit(1 if failed or passed == 0 else 0)

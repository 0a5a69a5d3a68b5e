"""
Shifter as a .tac deployment: C{twistd -ny shifter.tac}.

The same service as C{twistd shifter}, configured from the environment:
each option is the variable SHIFTER_ and its long name in upper case with
C{_} for C{-} (SHIFTER_PROXY, SHIFTER_LISTEN, SHIFTER_IDLE_TIMEOUT,
SHIFTER_CONFIG, ...); SHIFTER_PROXY, SHIFTER_ALLOW and SHIFTER_ALLOW_PORT
are each a comma-separated list, and a flag (SHIFTER_HOLD_SYN, ...) is
1, true or yes to set it, 0, false, no or empty to leave it off.

Any other SHIFTER_ variable is refused, naming it and the known ones: a
misspelt setting is not silently ignored.  So is a bad value, in one line
naming the option.
"""

import os
import sys

from twisted.application.service import Application
from twisted.python import usage

from shifter.service.tap import Options, makeService

LISTS = ("proxy", "allow", "allow-port")
# Set by Shifter itself in its worker processes; never an operator's.
INTERNAL = ("SHIFTER_WORKER_PARENT",)


def variable(option):
    return "SHIFTER_" + option.upper().replace("-", "_")


def refuse(reason):
    sys.stderr.write(f"shifter.tac: {reason}\n")
    sys.exit(1)


parameters = [option[0] for option in Options.optParameters if option[0] != "worker"]
flags = [option[0] for option in Options.optFlags]
known = {variable(option): option for option in parameters + flags + list(LISTS)}

for name in sorted(os.environ):
    if name.startswith("SHIFTER_") and name not in known and name not in INTERNAL:
        refuse(f"unknown variable {name}; the known ones are: {', '.join(sorted(known))}")

arguments = []
for option in parameters:
    value = os.environ.get(variable(option))
    if value is not None:
        arguments += ["--" + option, value]

for option in flags:
    value = os.environ.get(variable(option), "").strip().lower()
    if value in ("1", "true", "yes"):
        arguments.append("--" + option)
    elif value not in ("", "0", "false", "no"):
        refuse(f"{variable(option)}: expected 1, true, yes, 0, false or no, got {os.environ[variable(option)]!r}")

for listOption in LISTS:
    value = os.environ.get(variable(listOption), "")
    for item in filter(None, (part.strip() for part in value.split(","))):
        arguments += ["--" + listOption, item]

config = Options()
try:
    config.parseOptions(arguments)
except usage.UsageError as e:
    refuse(str(e))

application = Application("shifter")
# A start that fails makes twistd exit with status 1 (for systemd's
# Restart=on-failure and for scripts), as under twistd shifter.
makeService(config, exitStatusOnFailure=True).setServiceParent(application)

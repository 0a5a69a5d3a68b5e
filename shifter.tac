"""
Shifter as a .tac deployment: C{twistd -ny shifter.tac}.

The same service as C{twistd shifter}, configured from the environment:
SHIFTER_PROXY (required), and optionally SHIFTER_LISTEN, SHIFTER_RESOLVER,
SHIFTER_CONNECT_TIMEOUT, SHIFTER_HANDSHAKE_TIMEOUT, SHIFTER_IDLE_TIMEOUT,
SHIFTER_MAX_CONNECTIONS, SHIFTER_DRAIN_TIMEOUT, SHIFTER_METRICS,
SHIFTER_BALANCE, SHIFTER_CONNECT_TARGET, SHIFTER_PROXY_CREDENTIALS,
SHIFTER_CONFIG, SHIFTER_CONTROL, ..., each the value of the option of the
same name, and SHIFTER_PROXY, SHIFTER_ALLOW and SHIFTER_ALLOW_PORT, each a
comma-separated list.
"""

import os

from twisted.application.service import Application

from shifter.service.tap import Options, makeService

arguments = []
for option in Options.optParameters:
    value = os.environ.get("SHIFTER_" + option[0].upper().replace("-", "_"))
    if value is not None:
        arguments += ["--" + option[0], value]

for listOption in ("proxy", "allow", "allow-port"):
    value = os.environ.get("SHIFTER_" + listOption.upper().replace("-", "_"), "")
    for item in filter(None, (part.strip() for part in value.split(","))):
        arguments += ["--" + listOption, item]

config = Options()
config.parseOptions(arguments)

application = Application("shifter")
# A start that fails makes twistd exit with status 1 (for systemd's
# Restart=on-failure and for scripts), as under twistd shifter.
makeService(config, exitStatusOnFailure=True).setServiceParent(application)

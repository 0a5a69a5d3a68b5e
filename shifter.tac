"""
Shifter as a .tac deployment: C{twistd -ny shifter.tac}.

The same service as C{twistd shifter}, configured from the environment:
SHIFTER_PROXY (required), and optionally SHIFTER_LISTEN, SHIFTER_RESOLVER,
SHIFTER_CONNECT_TIMEOUT, SHIFTER_HANDSHAKE_TIMEOUT, SHIFTER_IDLE_TIMEOUT,
SHIFTER_MAX_CONNECTIONS, each the value of the option of the same name.
"""

import os

from twisted.application.service import Application

from shifter.tap import Options, makeService

arguments = []
for option in Options.optParameters:
    value = os.environ.get("SHIFTER_" + option[0].upper().replace("-", "_"))
    if value is not None:
        arguments += ["--" + option[0], value]

config = Options()
config.parseOptions(arguments)

application = Application("shifter")
makeService(config).setServiceParent(application)

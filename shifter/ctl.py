"""
C{python -m shifter.ctl}, the control socket's client, at its documented name: runs
L{shifter.admin.ctl.main}.  Nothing imports this module.
"""

import sys

from shifter.admin.ctl import main

if __name__ == "__main__":
    sys.exit(main())

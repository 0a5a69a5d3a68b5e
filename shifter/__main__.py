"""
C{python -m shifter}, the C{shifter} command under another name: runs
L{shifter.admin.command.main}.  Nothing imports this module.
"""

import sys

from shifter.admin.command import main

if __name__ == "__main__":
    sys.exit(main())

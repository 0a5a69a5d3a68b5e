"""
C{python -m shifter.doctor}, the gateway's check, at its documented name: runs
L{shifter.admin.doctor.main}.  Nothing imports this module.
"""

import sys

from shifter.admin.doctor import main

if __name__ == "__main__":
    sys.exit(main())

"""
C{python -m shifter.rules}, the gateway's rules for each resolver, at its documented name: runs
L{shifter.admin.rules.main}.  Nothing imports this module.
"""

from shifter.admin.rules import main

if __name__ == "__main__":
    main()

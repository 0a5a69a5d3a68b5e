"""
C{python -m shifter.kmod}: runs L{shifter.resolvers.kmod.main}.
"""

from shifter.resolvers.kmod import main

if __name__ == "__main__":
    main()

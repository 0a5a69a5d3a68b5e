"""
Proxy auto-config: the site's PAC script, fetched, kept current, and run
in helper processes that the reactor drives, never in the reactor itself.
"""

"""
The administrator's tools, each a command: C{ctl} (the control socket's client), C{doctor}, C{rules}, and the ruleset model doctor walks.
Each is run as C{python -m shifter.ctl} (or doctor, rules), through a small forwarding module at the top of C{shifter}.
May import: every package below it and the base modules; nothing in Shifter imports it.
"""

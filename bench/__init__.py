"""
Shifter's benchmark: Shifter against a direct path and against redsocks,
on a gateway built of network namespaces.  Run C{python3 bench/run.py}.
"""

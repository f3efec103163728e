"""Training of the small learned parts some methods need, with the model frozen (``vtoolkit train ...``).

- :mod:`vtoolkit.train.dyvte`: DyVTE's per-layer exit routers (``vtoolkit train dyvte``).
"""

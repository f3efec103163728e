"""Built-in benchmarks, one module each (see :mod:`vtoolkit.eval.benchmark`)."""

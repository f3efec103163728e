"""Built-in benchmarks, one module each (see :mod:`vtoolkit.eval.benchmark`), in the order they are listed."""

BUILTIN = ("pope", "mme", "chair", "hallusionbench", "amber")

"""Synthetic data: procedural scenes (:mod:`vtoolkit.data.scenes`) and the benchmarks built from them
(:mod:`vtoolkit.data.synthetic`), for the reference model, its training script, the demo and the tests."""

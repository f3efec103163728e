"""Evaluation: benchmarks (plug-ins, :mod:`vtoolkit.eval.benchmark`), the runner, sweeps, reports and scorers."""
from vtoolkit.eval.benchmark import Benchmark, get_benchmark, list_benchmarks, register_benchmark

__all__ = ["Benchmark", "get_benchmark", "list_benchmarks", "register_benchmark"]

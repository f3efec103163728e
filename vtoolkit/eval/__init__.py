"""Evaluation: POPE / CHAIR / MME scorers, datasets, the batched runner, sweeps and reports."""

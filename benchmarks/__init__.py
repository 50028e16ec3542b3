"""Benchmarks for jfreeze: what a frozen step costs, side by side with what users do today.

Run them as modules from the repository root (each takes ``--quick``, ``--gpu`` and
``--json PATH``)::

    python -m benchmarks.probe_step        # situation 1: probe -> frozen transformer -> probe
    python -m benchmarks.population        # K frozen models per step: JAX vmap vs PyTorch

Timings live here, never in tests; ``tests/test_benchmarks.py`` checks only the
deterministic parts (compiled matmul FLOPs against the analytic ideal).
"""

"""Measuring the mechanisms: speed/memory sweeps, approximation error, the report.

- :mod:`longattn.bench.harness`: ``sweep(BenchConfig)`` -> result document (JSON).
- :mod:`longattn.bench.cases`: benchmark settings of each mechanism, inputs, peers.
- :mod:`longattn.bench.flops`: useful FLOPs (exact pair counts for patterns).
- :mod:`longattn.bench.error`: relative error of approximations vs exact attention.
- :mod:`longattn.bench.report`: markdown tables and log-log plots.
- :mod:`longattn.bench.cli`: ``longattn bench``, ``longattn error``, ``longattn demo``.
"""

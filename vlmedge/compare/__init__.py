"""Compare bundles of one model (FP32, FP16, INT8, ...) on the same data: task accuracy, token
agreement and per-graph output error against the first bundle, latency, size and peak memory.

    report = compare_bundles(["bundle", "bundle-int8"], "synthetic:200", "cpu", "compare-out")

The evaluation file format (`--eval FILE.jsonl`) is described in `vlmedge.compare.evalset`.
"""

from vlmedge.compare.command import compare_command
from vlmedge.compare.compare import compare_bundles

__all__ = ["compare_bundles", "compare_command"]

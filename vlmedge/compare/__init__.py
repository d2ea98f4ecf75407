"""Compare bundles of one model (FP32, FP16, INT8, ...) on the same data: task accuracy, token
agreement and per-graph output error against the first bundle, latency, size and peak memory.

    report = compare_bundles(["bundle", "bundle-int8"], "synthetic:200", "cpu", "compare-out")

The evaluation file format (`--eval FILE.jsonl`) is described in `vlmedge.compare.evalset`.
"""

__all__ = ["compare_bundles", "compare_command"]


def __getattr__(name: str):
    # lazy: the CLI registers compare_command at start-up without loading numpy and the runtime
    if name == "compare_bundles":
        from vlmedge.compare.compare import compare_bundles

        return compare_bundles
    if name == "compare_command":
        from vlmedge.compare.command import compare_command

        return compare_command
    raise AttributeError(name)

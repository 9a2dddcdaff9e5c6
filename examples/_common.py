"""Formatting and timing shared by the examples (the usage guide's output format).

The examples run as scripts (`python examples/dense_example.py`), which puts this folder on
sys.path, so they import it as `_common`.
"""

import math
import statistics
import time

import jax


def fmt_ms(seconds: float) -> str:
    """Three significant digits, never in exponent form: 0.152, 35.1, 1234."""
    ms = seconds * 1e3
    decimals = max(0, 2 - math.floor(math.log10(ms))) if ms > 0 else 3
    return f"{ms:.{decimals}f}"


def fmt_tflops(flops: float, seconds: float) -> str:
    """TFLOPS as the guide prints them (1145, 584); two significant digits below 100
    (45, 5.3, 0.0038) so that CPU rates stay readable in the same unit."""
    t = flops / seconds / 1e12
    decimals = max(0, 1 - math.floor(math.log10(t))) if t > 0 else 0
    return f"{t:.{decimals}f}"


def benchmark(fn, *args, warmup: int, iters: int) -> float:
    """Median seconds of one call of fn(*args) (a jitted function), compiled beforehand."""
    compiled = fn.lower(*args).compile()
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)

"""The examples run end to end (tiny sizes) and print the usage guide's lines.

Each example runs as a subprocess in tmp_path (so nothing is written into the checkout),
with PYTHONPATH set to the directory holding the jax_fp8gemm this test process imported:
the examples then use the same package, whether it is installed or the dev tree.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import jax_fp8gemm

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
HAVE_FLAX = importlib.util.find_spec("flax") is not None and importlib.util.find_spec("optax") is not None
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def run_example(name, args, tmp_path, timeout=120):
    script = EXAMPLES / name
    if not script.exists():
        pytest.skip(f"{script} is not here (tests copied out of the checkout)")
    env = dict(os.environ)
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(jax_fp8gemm.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH")) if p)
    env.setdefault("JAX_PLATFORMS", "cpu")
    proc = subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{name} exited with {proc.returncode}:\n{out}"
    return proc.stdout


def assert_lines(out, prefixes):
    lines = out.splitlines()
    for prefix in prefixes:
        assert any(line.startswith(prefix) for line in lines), f"no {prefix!r} line in:\n{out}"


def test_dense_example(tmp_path):
    out = run_example("dense_example.py", ["--size", "128", "--warmup", "1", "--iters", "2"],
                      tmp_path)
    assert_lines(out, ["Size: 128x128x128", "FP8 GEMM:", "BF16 GEMM:", "Speedup:"])


def test_moe_example(tmp_path):
    out = run_example("moe_example.py", ["--experts", "2", "--hidden", "128", "--tokens", "64",
                                         "--ffn", "128", "--warmup", "1", "--iters", "2"],
                      tmp_path)
    assert_lines(out, ["Grouped GEMM:", "Padded GEMM:", "Speedup:"])


@pytest.mark.skipif(not HAVE_FLAX, reason="needs flax and optax")
def test_train_example(tmp_path):
    png = tmp_path / "curves.png"
    out = run_example("train_fp8.py", ["--steps", "8", "--batch", "2", "--seq", "16",
                                       "--d-model", "32", "--layers", "1", "--heads", "2",
                                       "--png", str(png), "--json", "out.json"], tmp_path)
    assert_lines(out, ["Final loss FP8:", "Final loss BF16:",
                       "Relative difference (FP8 - BF16) / BF16:", "Step time FP8:",
                       "Step time BF16:"])
    assert (tmp_path / "out.json").exists()
    if HAVE_MATPLOTLIB:
        assert png.exists() and png.stat().st_size > 0
    else:
        assert "matplotlib is not installed" in out
        assert not png.exists()

"""The benchmark program runs end to end (--quick: tiny shapes, seconds on a CPU) and writes
every implementation's rate and the accuracy of ours against the reference."""

import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

import jax_fp8gemm
from jax_fp8gemm import bench

# The directory holding the jax_fp8gemm this process imported (the installed package in CI,
# the source tree in a development build), for the subprocess to import the same one.
PKG_ROOT = str(Path(jax_fp8gemm.__file__).resolve().parent.parent)


def run_bench(tmp_path, *args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [PKG_ROOT, env.get("PYTHONPATH")]))
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "jax_fp8gemm.bench", *args, "--quick",
                           "--json", str(out)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


@pytest.mark.slow
def test_bench_grouped_quick(tmp_path):
    stdout, data = run_bench(tmp_path, "grouped")
    assert "ours/ragged-bf16" in stdout and "ours/DeepGEMM" in stdout
    # DeepGEMM needs a CUDA GPU: on the CPU the column is empty and the reason is recorded.
    assert data["meta"]["deepgemm"].startswith("skipped")
    assert all("deepgemm" not in row for row in data["rows"])
    assert set(data["summary"]) == {"contiguous_vs_ragged_bf16", "contiguous_vs_deepgemm",
                                    "masked_vs_deepgemm", "moe_example_vs_padded",
                                    "deepgemm_mismatches"}
    assert data["summary"]["deepgemm_mismatches"] == []
    kinds = {row["kind"] for row in data["rows"]}
    assert kinds == {"contiguous", "masked"}
    for row in data["rows"]:
        assert set(row["impls"]) == {"ours", "ragged_bf16", "ragged_fp8", "padded"}
        for impl, res in row["impls"].items():
            assert "error" not in res, (impl, res)
            assert res["tflops"] > 0
        assert sum(row["sizes"]) == row["useful_rows"]
        # ours and padded compute the same FP8 product as the dequantized reference.
        assert row["calc_diff"]["ours"] < 1e-4
        assert row["calc_diff"]["padded"] < 1e-4


@pytest.mark.slow
def test_bench_dense_quick(tmp_path):
    stdout, data = run_bench(tmp_path, "dense", "--png", "")
    assert "ours-fg" in stdout
    assert data["shapes"]
    for row in data["shapes"]:
        assert row["impls"]["ours_fg"]["tflops"] > 0
        assert row["calc_diff"]["ours_fg"] < 1e-3


@pytest.mark.slow
def test_bench_train_quick(tmp_path):
    stdout, data = run_bench(tmp_path, "train")
    assert "FP8 speedup" in stdout and "of copy" in stdout
    assert {row["kind"] for row in data["steps"]} == {"dense", "moe2"}
    for row in data["steps"]:
        for impl in ("fp8", "bf16"):
            assert "error" not in row["impls"][impl], row["impls"][impl]
            assert row["impls"][impl]["tflops"] > 0
        # The FP8 step's gradients are the BF16 step's, up to FP8 rounding.
        for name in ("dx", "dw1", "dw2"):
            assert 0 < row["calc_diff"][name] < 1e-2, (row["name"], name, row["calc_diff"])
    names = [q["name"] for q in data["quantize"]]
    assert names[0].startswith("copy") and "1 x 128 both layouts" in names and len(names) == 7
    assert all(q["gbps"] > 0 for q in data["quantize"])


def test_timer_warms_up_for_count_and_seconds_then_times_repeats():
    """Timer._median runs the program --warmup times and until --warmup-s seconds have
    passed (whichever is more), then times --repeats runs and keeps their median."""
    starts = []

    class Done:
        def block_until_ready(self):
            return self

    def program(sets):
        starts.append(time.perf_counter())
        time.sleep(0.002)
        return Done()

    def timer(warmup, warmup_s, repeats):
        return bench.Timer(types.SimpleNamespace(warmup=warmup, warmup_s=warmup_s,
                                                 repeats=repeats, target_calls=1,
                                                 max_program_s=1.0, quick=False))

    starts.clear()
    median = timer(warmup=1, warmup_s=0.05, repeats=3)._median(program, None)
    # The first timed run starts 0.05 s or more after the first warmup run (one run alone
    # would have satisfied the count), and the median is of 2 ms runs.
    assert starts[-3] - starts[0] >= 0.05
    assert median >= 0.002
    starts.clear()
    timer(warmup=4, warmup_s=0.0, repeats=2)._median(program, None)
    assert len(starts) == 4 + 2  # the count rules when the seconds are none

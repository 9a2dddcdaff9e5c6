"""Every CUDA handler inside an XLA command buffer (a CUDA graph), on the GPU.

XLA reads its flags once per process, so each configuration runs in a subprocess: one with
command buffers forced on for custom calls (and a minimum graph size of 1), one with them
off. XLA's thunk dumps of the first must show every op of this library inside a command
buffer, and both runs must give bit-identical results on the same inputs:
a handler that synchronized with the host, or read device memory at capture time instead
of at replay, would fail one or the other.
"""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import jax_fp8gemm

from conftest import gpu_device

SCRIPT = textwrap.dedent(r"""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    import jax_fp8gemm as fg

    def model(x, w, wg, sizes, xm, masked_m):
        qt, st = fg.quantize_fp8(x)                               # quantize_tensor
        qx, sx = fg.quantize_fp8_fine_grained(x)                  # quantize_block
        qw, sw = fg.quantize_fp8_fine_grained(w, block_shape=(128, 128))
        qg, sg = fg.quantize_fp8_fine_grained(wg, block_shape=(128, 128))
        dense = fg.fp8_gemm_fine_grained(qx, qw, sx, sw)          # gemm (Hopper kernel)
        odd = fg.fp8_gemm(qt[:, :200], qw[:200], st, sw[0, 0])    # gemm (K % 16 != 0)
        grouped = fg.grouped_gemm(qx, qg, sx, sg, sizes)          # grouped_contiguous
        # (masked rows of its own: a slice of qx would let XLA fuse the call with the slice
        # into a dynamic-slice fusion, which it keeps out of command buffers)
        qm, sm = fg.quantize_fp8_fine_grained(xm)
        masked = fg.grouped_gemm_masked(qm, masked_m, qg, sm, sg)  # grouped_masked
        loss = lambda x, wg: fg.fp8_grouped_matmul(x, sizes, wg).astype(jnp.float32).sum()
        dx, dwg = jax.grad(loss, argnums=(0, 1))(x, wg)           # grouped_kgrouped, quantize_dual
        return qt, st, qx, sx, dense, odd, grouped, masked, dx, dwg

    rng = np.random.default_rng(0)
    M, K, N, G = 300, 512, 384, 3
    args = (rng.standard_normal((M, K), np.float32),
            rng.standard_normal((K, N), np.float32) * 0.1,
            rng.standard_normal((G, K, N), np.float32) * 0.1,
            np.array([100, 0, 150], np.int32),
            rng.standard_normal((G, 64, K), np.float32), np.array([64, 1, 0], np.int32))
    fn = jax.jit(model)
    print(fn.lower(*args).compile().as_text())
    outs = [np.asarray(o) for o in fn(*args)]
    np.savez(sys.argv[1], *[np.atleast_1d(o).view(np.uint8) for o in outs])
""")

GRAPH_FLAGS = "--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1"
NO_GRAPH_FLAGS = "--xla_gpu_enable_command_buffer="
OPS = {"quantize_tensor", "quantize_block", "quantize_dual", "gemm", "grouped_contiguous",
       "grouped_masked", "grouped_kgrouped"}


def run(tmp_path, name, flags):
    script = tmp_path / "graph_model.py"
    script.write_text(SCRIPT)
    out, dump = tmp_path / f"{name}.npz", tmp_path / f"{name}_dump"
    env = dict(os.environ, XLA_FLAGS=f"{flags} --xla_dump_to={dump}",
               XLA_PYTHON_CLIENT_PREALLOCATE="false")
    # The subprocess imports the jax_fp8gemm this process imported.
    pkg_root = str(Path(jax_fp8gemm.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, str(script), str(out)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = np.load(out)
    outputs = [data[k] for k in sorted(data.files, key=lambda f: int(f.split("_")[1]))]
    return dump, outputs


def ops_in_command_buffers(dump):
    """This library's ops among the thunks XLA placed inside command buffers.

    XLA writes the final thunk sequence (`*thunk_sequence_after_thunk_passes.txt`: one line
    per thunk, `id: kind`, the commands of a kCommandBuffer indented under it) and the
    thunks' names (`*thunk_metadata.txt`: thunk_id and profile_annotation, which for a
    custom call is its HLO instruction's name, the FFI target's plus a suffix)."""
    # (Without command buffers XLA runs no thunk passes and writes only the plain sequence.)
    seqs = (sorted(dump.glob("*thunk_sequence_after_thunk_passes.txt"))
            or sorted(dump.glob("*thunk_sequence.txt")))
    metas = sorted(dump.glob("*thunk_metadata.txt"))
    assert seqs and metas, f"XLA wrote no thunk dumps in {dump}: {sorted(dump.iterdir())}"
    names = {}
    for meta in metas:
        for ann, tid in re.findall(r'profile_annotation: "([^"]*)"\s*thunk_id: (\d+)',
                                   meta.read_text()):
            names[int(tid)] = ann
    inside, in_buffer = set(), False
    for seq in seqs:
        for line in seq.read_text().splitlines():
            m = re.match(r"(\s*)(\d+): (\w+)", line)
            if not m:
                continue
            indent, tid, kind = len(m.group(1)), int(m.group(2)), m.group(3)
            if indent == 0:
                in_buffer = kind == "kCommandBuffer"
            elif in_buffer and kind == "kCustomCall":
                inside.add(re.sub(r"\.\d+$", "", names.get(tid, "")))
    prefix = "jax_fp8gemm_"
    return {n[len(prefix):] for n in inside if n.startswith(prefix)}


@pytest.mark.gpu
def test_custom_calls_run_inside_command_buffers(tmp_path):
    if gpu_device() is None:
        pytest.skip("needs a CUDA build of jax_fp8gemm and a JAX GPU device")
    graph_dump, graph_out = run(tmp_path, "graph", GRAPH_FLAGS)
    plain_dump, plain_out = run(tmp_path, "plain", NO_GRAPH_FLAGS)

    assert ops_in_command_buffers(graph_dump) == OPS
    assert ops_in_command_buffers(plain_dump) == set()

    assert len(graph_out) == len(plain_out) == 10
    for i, (g, p) in enumerate(zip(graph_out, plain_out)):
        assert g.shape == p.shape, i
        np.testing.assert_array_equal(g, p, err_msg=f"output {i}")

"""jax.export round trip: a function using the FFI custom calls is exported, serialized to
bytes, deserialized and called on fresh inputs; the result must equal the direct call bit
for bit. The serialized module names the versioned FFI targets (jax_fp8gemm_<op>_v1)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_fp8gemm as fg
from jax_fp8gemm import _ffi

from helpers import randn

M, K, N, G, BS = 33, 200, 129, 3, 128
TARGETS = [_ffi.target_name(op) for op in ("quantize_block", "gemm", "grouped_contiguous")]


def model(x, w_dense, w_grouped, group_sizes):
    """Quantizes x 1 x bs and both weights bs x bs, then a fine-grained dense GEMM (with an
    accumulator) and a grouped GEMM over the same activations."""
    qx, sx = fg.quantize_fp8_fine_grained(x, BS)
    qw, sw = fg.quantize_fp8_fine_grained(w_dense, BS, block_shape=(BS, BS))
    qg, sg = fg.quantize_fp8_fine_grained(w_grouped, BS, "e5m2", block_shape=(BS, BS))
    acc = x[:, :N].astype(jnp.float32)
    dense = fg.fp8_gemm_fine_grained(qx, qw, sx, sw, BS, jnp.float32, accumulator=acc)
    grouped = fg.grouped_gemm(qx, qg, sx, sg, group_sizes, out_dtype=jnp.bfloat16, block_size=BS)
    return dense, grouped, qx, sx


def avals():
    return (jax.ShapeDtypeStruct((M, K), jnp.float32),
            jax.ShapeDtypeStruct((K, N), jnp.float32),
            jax.ShapeDtypeStruct((G, K, N), jnp.float32),
            jax.ShapeDtypeStruct((G,), jnp.int32))


def inputs(seed):
    rng = np.random.default_rng(seed)
    return (randn(rng, (M, K)), randn(rng, (K, N), 0.1), randn(rng, (G, K, N), 0.1),
            np.array([10, -3, 30], np.int32) if seed % 2 else np.array([5, 0, 28], np.int32))


def export(**kwargs):
    checks = [jax.export.DisabledSafetyCheck.custom_call(name) for name in TARGETS]
    return jax.export.export(jax.jit(model), platforms=["cpu"], disabled_checks=checks,
                             **kwargs)(*avals())


def assert_bitwise_equal(got, want):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        g, w = np.asarray(g), np.asarray(w)
        assert g.dtype == w.dtype and g.shape == w.shape, (g.dtype, g.shape, w.dtype, w.shape)
        np.testing.assert_array_equal(g.view(np.uint8), w.view(np.uint8))


def check_against_direct_call(exported):
    for seed in (1, 2):  # fresh inputs, not the ones anything was traced with
        args = inputs(seed)
        with jax.default_device(jax.devices("cpu")[0]):
            got = exported.call(*args)
            want = jax.jit(model)(*args)
        assert_bitwise_equal(got, want)
        # The grouped rows outside every group are zero in both.
        rows = min(int(np.maximum(args[3], 0).sum()), M)
        assert (np.asarray(got[1])[rows:] == 0).all()


def test_export_call():
    """The exported (not serialized) function: runs without flatbuffers."""
    exported = export()
    assert exported.platforms == ("cpu",)
    check_against_direct_call(exported)


def test_export_serialize_round_trip():
    # jax's Exported.serialize() needs the flatbuffers package, which is not among this
    # project's dependencies (pip install flatbuffers to run this test).
    pytest.importorskip("flatbuffers")
    blob = export().serialize()
    assert isinstance(blob, (bytes, bytearray)) and blob
    for name in TARGETS:  # the versioned names travel in the serialized module
        assert name.encode() in bytes(blob), name
    reloaded = jax.export.deserialize(blob)
    assert reloaded.platforms == ("cpu",)
    check_against_direct_call(reloaded)


def test_export_names_versioned_targets():
    text = export().mlir_module()
    for name in TARGETS:
        assert f"stablehlo.custom_call @{name}(" in text, name
    assert all(t.endswith("_" + _ffi.FFI_VERSION) for t in TARGETS)
    assert _ffi.FFI_VERSION == "v1"


def test_export_without_disabled_checks_is_refused():
    """Without the disabled_checks, jax.export refuses the (non-allowlisted) custom calls."""
    with pytest.raises(ValueError, match="custom calls whose targets have no compatibility"):
        jax.export.export(jax.jit(model), platforms=["cpu"])(*avals())

"""Benchmarks: jax_fp8gemm beside XLA (BF16 and FP8) and DeepGEMM.

    python -m jax_fp8gemm.bench dense [--quick] [--json PATH] [--png PATH] [--shapes ...]
    python -m jax_fp8gemm.bench grouped [--quick] [--json PATH] [--workloads ...]
                                        (jax_fp8gemm/_bench_grouped.py has its notes)
    python -m jax_fp8gemm.bench train [--quick] [--json PATH] [--hidden ...]
                                        (jax_fp8gemm/_bench_train.py has its notes)

`dense` times, per shape and in one run:

  ours-fg    fp8_gemm_fine_grained(a, b, ..., b_layout="nk"): A 1x128 scales, B 128x128
             scales (the DeepSeek-V3 forward recipe, DeepGEMM's 1D2D kernel), bf16 out
  ours-pt    fp8_gemm(a, b, scale_a, scale_b, b_layout="nk"): per-tensor scales, bf16 out
  ours-1d1d  fp8_gemm_fine_grained(..., b_layout="nk", b_scaling="row", out_dtype=float32):
             1x128 scales on both operands (the weight-gradient recipe), float32 out
  XLA-BF16   lax.dot_general of bf16 a [M, K] and b [N, K] contracted on K, bf16 out (what
             jnp.dot does; XLA picks cuBLAS or its Triton GEMM)
  XLA-FP8    lax.dot_general on the same float8_e4m3fn operands as ours-pt, NT layout,
             f8 x f8 -> bf16 (`xla_fp8_raw` in the JSON): XLA's FP8 dot, one cuBLASLt FP8
             GEMM. It leaves the scales out, so it does slightly less than ours-pt. The
             dequantize-then-dot pattern (convert(fp8 -> bf16) * per-tensor scale on each
             operand, Flax's FP8 recipe; `xla_fp8` in the JSON) computes exactly what ours-pt
             computes and is printed in the XLA FP8 detail lines; the compiled programs' GEMM
             custom calls (e.g. __cublas$lt$matmul$f8) are recorded for both.
  DeepGEMM   deep_gemm.fp8_gemm_nt on exactly ours-fg's quantized operands, when
             `import deep_gemm` works (never a dependency; see below).

FLOPs are 2*M*N*K for every implementation; rates are TFLOP/s (1e12 FLOP/s).

How JAX ops are timed (device time, not Python dispatch). Per implementation and shape, R
input sets are made, R = clamp(ceil(--l2-bytes / bytes one call moves), 2, --max-sets),
so one round over the sets moves >= 200 MB (4x the H200's 50 MB L2) and no call finds its
inputs in L2. One jitted program runs L rounds of the op over the R sets: the outputs of
a round go through lax.optimization_barrier (so XLA can neither drop nor narrow a call,
e.g. by slicing a dot) and the next round's operands come out of a barrier that also
takes the previous round's result (so no call is CSE'd with another); the program returns
one float, the sum of element [0, 0] of every output. Each program is compiled, run
`--warmup` times and for at least `--warmup-s` seconds (so that the GPU comes to the
timing from steady work, not from the idle gaps of compiling and checking: the grouped
benchmark's ~20 us calls read 140-236 TFLOP/s across runs of the same code), then timed
`--repeats` times with time.perf_counter around the call and .block_until_ready(); the
median is kept. Two programs are timed, with 1 round and with L rounds (L*R >=
--target-calls calls, about --max-program-s seconds at most), and the time per call is
the slope (t_L - t_1) / ((L - 1) * R): the fixed cost of a jitted call (dispatch, launch
of the first kernel, the final wait) cancels out. The plain t_L / (L*R) is recorded too.
Check of the harness: XLA's BF16 dot is also timed as a plain Python loop of single
jitted calls over the same sets with block_until_ready at the end, divided by the number
of calls; the table "harness check" prints the three side by side. For large shapes they
agree (device-bound); for small ones the loop is dispatch-bound and slower, which is what
the rotated programs remove.

How DeepGEMM is timed: as its own tests do (tests/test_fp8_fp4.py), with
deep_gemm.testing.bench_kineto: the PyTorch profiler's kernel time of the GEMM kernel
('gemm_' in its name), averaged over 30 calls each preceded by an 8 GB memset that flushes
the L2. Operands as its tests prepare them (tests/generators.py): A [M, K] e4m3 K-major
with float32 1x128 scales [M, K/128], B [N, K] e4m3 with float32 128x128 scales
[N/128, K/128], D bf16 [M, N]; here they are ours-fg's own quantized tensors, shared
through DLPack, so the two GEMMs read identical inputs. A's scales are put once, outside
the timed region, into the MN-major TMA-aligned layout the SM90 kernel reads
(deep_gemm.get_mn_major_tma_aligned_tensor; fp8_gemm_nt would otherwise transpose them
inside every call). As a second, like-for-like number, DeepGEMM is also timed over R
rotated sets with CUDA events (queued behind a ~10 ms sleep kernel so the host cannot
starve the GPU), which counts launch gaps as the JAX programs do; both are printed in the
"DeepGEMM method check" lines and stored in the JSON; the table uses the kineto number.

DeepGEMM compiles a kernel per shape at its first call (nvcc, seconds each). Before any
timing, child processes (at most 8) make that first call for every shape, in parallel:
that fills DeepGEMM's on-disk kernel cache ($DG_JIT_CACHE_DIR, default ~/.deep_gemm), and
probes that `import deep_gemm` and a GEMM work at all without risking this process (a crash
in std::regex was seen unless the process runs with
LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libstdc++.so.6). DeepGEMM runs after all JAX timing,
so PyTorch and its profiler never run beside a JAX measurement; the JSON is written once
after the JAX phase and again at the end. XLA_PYTHON_CLIENT_PREALLOCATE=false is set
before JAX starts so that JAX and PyTorch share the GPU.

Accuracy: per shape, every output of input set 0 is compared with the float32 product of
the unquantized bf16 inputs by calc_diff (jax_fp8gemm.reference.calc_diff, DeepGEMM's
metric; for outputs over 2**24 elements the same formula from float32 row sums made on the
device, summed in float64 on the host). DeepGEMM's output is compared with ours-fg's the
same way and must agree to < 1e-3.

`--quick`: three tiny shapes, 2 sets, 2 rounds: seconds on a CPU (CI smoke test). On a CPU
(or any non-CUDA backend) DeepGEMM is skipped. Subcommands `grouped` and `train` will sit
beside `dense`.
"""

from __future__ import annotations

import os

# Before JAX starts a backend: leave GPU memory to PyTorch (DeepGEMM) in the same process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

import jax_fp8gemm as fg  # noqa: E402
from jax_fp8gemm import reference  # noqa: E402

# ---------------------------------------------------------------------------------------
# Shapes.

DEEPSEEK_M = (64, 128, 4096)
DEEPSEEK_NK = ((2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168),
               (7168, 2048))
DEEPSEEK = tuple((m, n, k) for m in DEEPSEEK_M for n, k in DEEPSEEK_NK)
SQUARE = ((2048, 2048, 2048), (4096, 4096, 4096), (8192, 8192, 8192), (2049, 2049, 2049))
QUICK = ((64, 256, 512), (128, 384, 256), (130, 200, 300))
SHAPE_GROUPS = {"deepseek": DEEPSEEK, "square": SQUARE, "all": DEEPSEEK + SQUARE,
                "quick": QUICK}

BLOCK = 128
NT = (((1,), (1,)), ((), ()))  # contract a [M, K] with b [N, K] on K
BF16, F32 = jnp.bfloat16, jnp.float32

# ---------------------------------------------------------------------------------------
# Implementations. Each takes one prepared operand tuple and returns [M, N].


def _prep_fg(a, b):
    a8, sa = fg.quantize_fp8_fine_grained(a, BLOCK)
    b8, sb = fg.quantize_fp8_fine_grained(b, BLOCK, block_shape=(BLOCK, BLOCK))
    return a8, sa, b8, sb


def _prep_pt(a, b):
    a8, sa = fg.quantize_fp8(a)
    b8, sb = fg.quantize_fp8(b)
    return a8, sa, b8, sb


def _prep_rows(a, b):
    a8, sa = fg.quantize_fp8_fine_grained(a, BLOCK)
    b8, sb = fg.quantize_fp8_fine_grained(b, BLOCK)
    return a8, sa, b8, sb


def _prep_bf16(a, b):
    return a, b


PREPS = {"fg": jax.jit(_prep_fg), "pt": jax.jit(_prep_pt), "rows": jax.jit(_prep_rows),
         "bf16": jax.jit(_prep_bf16)}


def _ours_fg(a8, sa, b8, sb):
    return fg.fp8_gemm_fine_grained(a8, b8, sa, sb, BLOCK, out_dtype=BF16, b_layout="nk")


def _ours_pt(a8, sa, b8, sb):
    return fg.fp8_gemm(a8, b8, sa, sb, out_dtype=BF16, b_layout="nk")


def _ours_1d1d(a8, sa, b8, sb):
    return fg.fp8_gemm_fine_grained(a8, b8, sa, sb, BLOCK, out_dtype=F32, b_layout="nk",
                                    b_scaling="row")


def _xla_bf16(a, b):
    return lax.dot_general(a, b, NT, preferred_element_type=BF16)


def _xla_fp8(a8, sa, b8, sb):
    # The dequantize-then-dot pattern XLA's GEMM rewriter turns into a cuBLASLt FP8 GEMM
    # with scale_a / scale_b (as Flax's fp8 ops write it).
    da = a8.astype(BF16) * jnp.broadcast_to(sa.astype(BF16), a8.shape)
    db = b8.astype(BF16) * jnp.broadcast_to(sb.astype(BF16), b8.shape)
    return lax.dot_general(da, db, NT, preferred_element_type=BF16)


def _xla_fp8_raw(a8, sa, b8, sb):
    del sa, sb  # unscaled: applied outside, for the accuracy check only
    return lax.dot_general(a8, b8, NT, preferred_element_type=BF16)


def _cdiv(a, b):
    return -(-a // b)


def _bytes_fg(m, n, k):
    kb = _cdiv(k, BLOCK)
    return m * k + n * k + 4 * (m * kb + _cdiv(n, BLOCK) * kb) + 2 * m * n


def _bytes_pt(m, n, k):
    return m * k + n * k + 8 + 2 * m * n


def _bytes_1d1d(m, n, k):
    return m * k + n * k + 4 * (m + n) * _cdiv(k, BLOCK) + 4 * m * n


def _bytes_bf16(m, n, k):
    return 2 * (m * k + n * k) + 2 * m * n


# name: (label, prep, fn, bytes per call, post(out, prepared) -> value compared with ref)
IMPLS = {
    "ours_fg": ("ours-fg", "fg", _ours_fg, _bytes_fg, None),
    "ours_pt": ("ours-pt", "pt", _ours_pt, _bytes_pt, None),
    "ours_1d1d": ("ours-1d1d", "rows", _ours_1d1d, _bytes_1d1d, None),
    "xla_bf16": ("XLA-BF16", "bf16", _xla_bf16, _bytes_bf16, None),
    "xla_fp8": ("XLA-FP8", "pt", _xla_fp8, _bytes_pt, None),
    "xla_fp8_raw": ("XLA-FP8-raw", "pt", _xla_fp8_raw, _bytes_pt,
                    lambda out, p: out.astype(F32) * (p[1] * p[3])),
}

# ---------------------------------------------------------------------------------------
# Small helpers.


def _fmt_rate(x):
    """TFLOP/s, three significant digits at most ('1234', '512', '45.1', '0.0123')."""
    if x is None or not math.isfinite(x):
        return "-"
    if x >= 100:
        return f"{x:.0f}"
    if x <= 0:
        return "0"
    return f"{x:.{max(0, 2 - math.floor(math.log10(x)))}f}"


def _fmt_ratio(x):
    return "-" if x is None or not math.isfinite(x) else f"{x:.2f}"


def _fmt_us(s):
    return "-" if s is None else f"{s * 1e6:.1f}"


def _fmt_diff(x):
    return "-" if x is None else f"{x:.1e}"


def _ratio(a, b):
    if a is None or b is None or not b:
        return None
    return a / b


def _geomean(xs):
    xs = [x for x in xs if x is not None and x > 0]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None


def _shape_str(s):
    return "x".join(map(str, s))


def _log(*args):
    print(*args, flush=True)


_ROW_SUMS = jax.jit(lambda x, y: (
    jnp.sum(x.astype(F32) * y.astype(F32), axis=-1),
    jnp.sum(jnp.square(x.astype(F32)) + jnp.square(y.astype(F32)), axis=-1)))


def calc_diff(x, y):
    """reference.calc_diff (1 - 2 sum(xy) / sum(x^2 + y^2)); big arrays reduce on the device
    (float32 row sums, added up in float64 here)."""
    if x.size <= 1 << 24:
        return reference.calc_diff(np.asarray(x.astype(F32)), np.asarray(y.astype(F32)))
    xy, ss = (np.asarray(v, np.float64).sum() for v in _ROW_SUMS(x, y))
    return float(1 - 2 * xy / ss) if ss else 0.0


def _gemm_targets(compiled):
    """The GEMM back ends in a compiled XLA program: custom-call targets and fusion kinds."""
    try:
        text = compiled.as_text()
    except Exception:  # noqa: BLE001 - diagnostics only
        return []
    found = set(re.findall(r'custom_call_target="([^"]+)"', text))
    found |= {f"fusion:{k}" for k in re.findall(r'"kind":"(__triton[a-z_]*)"', text)}
    if re.search(r"= \S+ dot\(", text):
        found.add("dot")  # an XLA dot left as such (CPU, or not rewritten into a library call)
    return sorted(found)


# ---------------------------------------------------------------------------------------
# Timing.


class Timer:
    def __init__(self, args):
        self.warmup = args.warmup
        self.warmup_s = args.warmup_s
        self.repeats = args.repeats
        self.target_calls = args.target_calls
        self.max_program_s = args.max_program_s
        self.fixed_rounds = 2 if args.quick else None

    def _median(self, compiled, sets):
        start, runs = time.perf_counter(), 0
        while runs < self.warmup or time.perf_counter() - start < self.warmup_s:
            compiled(sets).block_until_ready()
            runs += 1
        times = []
        for _ in range(self.repeats):
            t0 = time.perf_counter()
            compiled(sets).block_until_ready()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    @staticmethod
    def _program(fn, sets, rounds):
        def prog(sets):
            acc = jnp.zeros((), F32)
            for r in range(rounds):
                if r:
                    sets, acc = lax.optimization_barrier((sets, acc))
                outs = lax.optimization_barrier(tuple(fn(*s) for s in sets))
                acc = acc + sum(o[(0,) * o.ndim].astype(F32) for o in outs)
            return acc

        return jax.jit(prog).lower(sets).compile()

    def rotated(self, fn, sets):
        """Seconds per call of fn over the rotated sets (see the module docstring)."""
        r = len(sets)
        c1 = self._program(fn, sets, 1)
        targets = _gemm_targets(c1)
        t1 = self._median(c1, sets)
        del c1
        if self.fixed_rounds:
            rounds = self.fixed_rounds
        else:
            rounds = max(2, min(_cdiv(self.target_calls, r), int(self.max_program_s / t1)))
        cl = self._program(fn, sets, rounds)
        tl = self._median(cl, sets)
        del cl
        plain = tl / (rounds * r)
        slope = (tl - t1) / ((rounds - 1) * r)
        # The slope needs a long program clearly longer than the short one (not so with
        # --quick's 2 rounds on a noisy CPU); otherwise keep the plain quotient.
        per_call = slope if (not self.fixed_rounds and tl > 1.5 * t1 and slope > 0) else plain
        return dict(s=per_call, slope_s=slope, plain_s=plain, t1_s=t1, tl_s=tl,
                    rounds=rounds, sets=r, targets=targets)

    def loop(self, single, sets, calls):
        """Seconds per call of a Python loop of single jitted calls (dispatch included)."""
        for s in sets:
            single(*s).block_until_ready()
        times = []
        for _ in range(self.repeats):
            t0 = time.perf_counter()
            out = None
            for i in range(calls):
                out = single(*sets[i % len(sets)])
            out.block_until_ready()
            times.append((time.perf_counter() - t0) / calls)
        return statistics.median(times)


# ---------------------------------------------------------------------------------------
# Inputs.


def _num_sets(args, nbytes):
    if args.quick:
        return 2
    return max(2, min(args.max_sets, _cdiv(int(args.l2_bytes), nbytes)))


def _make_inputs(shape, count, seed):
    """count (a bf16 [M, K], b bf16 [N, K]) pairs of standard normals, reproducible."""
    m, n, k = shape
    key = jax.random.fold_in(jax.random.key(seed), (m * 1_000_003 + n * 1_009 + k) % 2**31)
    gen = jax.jit(lambda key: (jax.random.normal(jax.random.fold_in(key, 0), (m, k), BF16),
                               jax.random.normal(jax.random.fold_in(key, 1), (n, k), BF16)))
    return [gen(jax.random.fold_in(key, i)) for i in range(count)]


def _reference(a, b):
    return jnp.dot(a.astype(F32), b.astype(F32).T, precision=lax.Precision.HIGHEST)


# ---------------------------------------------------------------------------------------
# DeepGEMM (optional).

_DG_WARM = r'''
import json, sys, time
try:
    import torch
    import deep_gemm
except Exception as e:
    print("IMPORT-FAILED", repr(e)[:500], flush=True)
    sys.exit(3)

def rows(x):  # 1 x 128 blocks along K, float32 scales [M, K/128]
    m, k = x.shape
    xb = x.float().view(m, k // 128, 128)
    s = xb.abs().amax(dim=-1).clamp_min(1e-4) / 448.0
    return (xb / s[..., None]).to(torch.float8_e4m3fn).view(m, k), s

def blocks(x):  # 128 x 128 blocks, float32 scales [ceil(N/128), K/128]
    n, k = x.shape
    pn = -(-n // 128) * 128
    xp = torch.zeros(pn, k, device=x.device)
    xp[:n] = x.float()
    xb = xp.view(pn // 128, 128, k // 128, 128)
    s = xb.abs().amax(dim=(1, 3)).clamp_min(1e-4) / 448.0
    q = (xb / s[:, None, :, None]).to(torch.float8_e4m3fn).view(pn, k)[:n].contiguous()
    return q, s

for m, n, k in json.loads(sys.argv[1]):
    t0 = time.time()
    try:
        qa, sa = rows(torch.randn(m, k, device="cuda"))
        qb, sb = blocks(torch.randn(n, k, device="cuda"))
        if hasattr(deep_gemm, "get_mn_major_tma_aligned_tensor"):
            sa = deep_gemm.get_mn_major_tma_aligned_tensor(sa)
        d = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        try:
            deep_gemm.fp8_gemm_nt((qa, sa), (qb, sb), d, disable_ue8m0_cast=True)
        except TypeError:
            deep_gemm.fp8_gemm_nt((qa, sa), (qb, sb), d)
        torch.cuda.synchronize()
        print("OK", m, n, k, "%.1f" % (time.time() - t0), flush=True)
    except Exception as e:
        print("FAIL", m, n, k, repr(e)[:300].replace("\n", " "), flush=True)
'''


def deepgemm_eligible(shape):
    """DeepGEMM's SM90 FP8 GEMM needs K in whole 128-blocks (and 16-byte aligned rows)."""
    m, n, k = shape
    return k % BLOCK == 0 and n % 8 == 0


def deepgemm_prewarm(shapes, timeout_s):
    """Compile DeepGEMM's kernels for `shapes` in child processes (parallel nvcc runs that fill
    its on-disk cache) and probe that it works. Returns (usable, {shape: error}, note)."""
    if not shapes:
        return False, {}, "no shape DeepGEMM can run (K must be a multiple of 128)"
    workers = max(1, min(8, (os.cpu_count() or 2) // 2, len(shapes)))
    chunks = [shapes[i::workers] for i in range(workers)]
    _log(f"DeepGEMM: compiling kernels for {len(shapes)} shapes in {workers} child "
         f"processes (DG_JIT_CACHE_DIR={os.environ.get('DG_JIT_CACHE_DIR', '~/.deep_gemm')})")
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", _DG_WARM, json.dumps(c)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in chunks]
    failed, outputs, codes, timed_out = {}, [], [], []
    deadline = time.monotonic() + timeout_s
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            timed_out.append(False)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
            timed_out.append(True)
        outputs.append(out)
        codes.append(p.returncode)
    done = set()
    for chunk, out, late in zip(chunks, outputs, timed_out):
        for line in out.splitlines():
            parts = line.split(maxsplit=4)
            if parts and parts[0] in ("OK", "FAIL") and len(parts) >= 4:
                shape = tuple(map(int, parts[1:4]))
                done.add(shape)
                if parts[0] == "FAIL":
                    failed[shape] = parts[4] if len(parts) > 4 else "?"
        if late:
            for shape in map(tuple, chunk):
                if shape not in done:
                    failed[shape] = f"not compiled within --deepgemm-timeout {timeout_s:.0f} s"
    _log(f"DeepGEMM: compile phase took {time.perf_counter() - t0:.0f} s")
    if all(c == 3 for c in codes):
        reason = next((ln for o in outputs for ln in o.splitlines()
                       if ln.startswith("IMPORT-FAILED")), "IMPORT-FAILED ?")
        return False, failed, f"not importable ({reason[len('IMPORT-FAILED '):]})"
    crashed = [i for i, c in enumerate(codes) if c is not None and c < 0 and not timed_out[i]]
    if crashed:
        i = crashed[0]
        tail = "\n".join("  | " + ln for ln in outputs[i].splitlines()[-6:])
        preload = os.environ.get("LD_PRELOAD")
        hint = (f"LD_PRELOAD is {preload}" if preload else
                "if this is the std::regex crash, run the benchmark with "
                "LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libstdc++.so.6")
        return False, failed, (f"unusable: a child process died of signal {-codes[i]} ({hint}); "
                               f"its last lines:\n{tail}")
    for i, c in enumerate(codes):
        if c not in (0, None) and not timed_out[i]:
            _log(f"DeepGEMM compile process {i} exited with {c}:\n"
                 + "\n".join("  | " + ln for ln in outputs[i].splitlines()[-8:]))
    ok = sum(1 for o in outputs for ln in o.splitlines() if ln.startswith("OK "))
    for shape, err in failed.items():
        _log(f"DeepGEMM compile phase: {_shape_str(shape)} failed: {err}")
    if not ok:
        return False, failed, "no GEMM ran in the child processes"
    return True, failed, f"{ok} of {len(shapes)} shapes compiled and ran"


def _to_torch(x, torch):
    """A JAX array as a torch CUDA tensor, sharing memory through DLPack (FP8 as uint8 bits,
    viewed back as float8_e4m3fn)."""
    if x.dtype == jnp.float8_e4m3fn:
        bits = lax.bitcast_convert_type(x, jnp.uint8)
        return torch.from_dlpack(bits).view(torch.float8_e4m3fn)
    return torch.from_dlpack(x)


def load_bench_kineto():
    """deep_gemm.testing.bench_kineto (its tests' timer), or None where its layout lacks it."""
    try:
        from deep_gemm.testing import bench_kineto
    except Exception:  # noqa: BLE001 - older layouts
        return None
    return bench_kineto


def events_flushed(torch, call, iters=30):
    """Median time of call() by CUDA events, the L2 flushed (a 256 MB memset) before each."""
    flush = torch.empty(int(256e6 // 4), dtype=torch.int, device="cuda")
    start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
    times = []
    for _ in range(iters):
        flush.zero_()
        start.record()
        call()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


class DeepGEMM:
    def __init__(self, dg, torch, args):
        self.dg, self.torch, self.args = dg, torch, args
        self.kwargs = {"disable_ue8m0_cast": True}  # as its tests do on SM90
        self.bench_kineto = load_bench_kineto()

    def _call(self, a, sa, b, sb, d):
        try:
            self.dg.fp8_gemm_nt((a, sa), (b, sb), d, **self.kwargs)
        except TypeError:
            if not self.kwargs:
                raise
            self.kwargs = {}
            self.dg.fp8_gemm_nt((a, sa), (b, sb), d)

    def measure(self, shape, prepared, ours_out, ref):
        torch, dg = self.torch, self.dg
        m, n, k = shape
        sets = []
        for a8, sa, b8, sb in prepared:
            ta, tsa, tb, tsb = (_to_torch(x, torch) for x in (a8, sa, b8, sb))
            if hasattr(dg, "get_mn_major_tma_aligned_tensor"):
                tsa = dg.get_mn_major_tma_aligned_tensor(tsa)
            sets.append((ta, tsa, tb, tsb, torch.empty((m, n), device="cuda",
                                                       dtype=torch.bfloat16)))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        self._call(*sets[0])
        torch.cuda.synchronize()
        first_s = time.perf_counter() - t0
        d0 = jax.dlpack.from_dlpack(sets[0][4])
        res = dict(first_call_s=first_s, diff_vs_ref=calc_diff(d0, ref),
                   diff_vs_ours=calc_diff(d0, ours_out))
        del d0

        # 1. Its tests' method: profiler kernel time, L2 flushed before every call.
        kin = None
        if self.bench_kineto is not None:
            try:
                kin = self.bench_kineto(lambda: self._call(*sets[0]), "gemm_",
                                        suppress_kineto_output=True)
            except Exception as e:  # noqa: BLE001
                _log(f"  DeepGEMM bench_kineto failed ({e!r}); using CUDA events")
        if kin is None or not kin > 0:
            kin = events_flushed(torch, lambda: self._call(*sets[0]))
            res["kineto_fallback"] = "cuda events, L2 flushed before each call"
        res["kineto_s"] = kin

        # 2. Like the JAX programs: rotated sets, back to back, CUDA events.
        r = len(sets)
        calls = r * max(2, min(_cdiv(self.args.target_calls, r),
                               int(self.args.max_program_s / max(kin * r, 1e-9))))
        calls = min(calls, 512)
        for s in sets:
            self._call(*s)
        torch.cuda.synchronize()
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        times = []
        for _ in range(self.args.repeats):
            if hasattr(torch.cuda, "_sleep"):
                torch.cuda._sleep(int(2e7))  # ~10 ms: the host queues the calls meanwhile
            start.record()
            for i in range(calls):
                self._call(*sets[i % r])
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / calls)
        res.update(rotated_s=statistics.median(times), rotated_calls=calls, sets=r)
        del sets
        torch.cuda.empty_cache()
        return res


# ---------------------------------------------------------------------------------------
# The dense benchmark.


def _parse_shapes(tokens, quick):
    if not tokens:
        return list(QUICK if quick else DEEPSEEK + SQUARE)
    out = []
    for t in tokens:
        for part in t.split(","):
            part = part.strip().lower()
            if not part:
                continue
            if part in SHAPE_GROUPS:
                out += SHAPE_GROUPS[part]
            elif re.fullmatch(r"\d+x\d+x\d+", part):
                out.append(tuple(int(v) for v in part.split("x")))
            elif part.isdigit():
                out.append((int(part),) * 3)
            else:
                raise SystemExit(f"bad shape {part!r}: use MxNxK, N (for NxNxN) or one of "
                                 f"{', '.join(SHAPE_GROUPS)}")
    seen = set()
    return [s for s in out if not (s in seen or seen.add(s))]


def _bench_shape(shape, args, timer, impl_names, harness):
    m, n, k = shape
    flops = 2.0 * m * n * k
    sets_needed = {name: _num_sets(args, IMPLS[name][3](m, n, k)) for name in impl_names}
    count = max(sets_needed.values())
    raw = _make_inputs(shape, count, args.seed)
    ref = _reference(*raw[0])
    prepared = {}
    row = dict(m=m, n=n, k=k, flops=flops, impls={}, calc_diff={})
    outs0 = {}
    for name in impl_names:
        label, prep, fn, _, post = IMPLS[name]
        if prep not in prepared:
            prepared[prep] = [PREPS[prep](a, b) for a, b in raw]
        sets = tuple(tuple(p) for p in prepared[prep][:sets_needed[name]])
        try:
            res = timer.rotated(fn, sets)
        except Exception as e:  # noqa: BLE001 - report and go on with the other columns
            _log(f"  {label}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:300]}")
            row["impls"][name] = dict(error=f"{type(e).__name__}: {e}"[:2000])
            continue
        res["tflops"] = flops / res["s"] / 1e12
        single = jax.jit(fn)
        out = single(*sets[0])
        val = post(out, sets[0]) if post else out
        row["calc_diff"][name] = calc_diff(val, ref)
        if name == "ours_fg":
            outs0["ours_fg"] = out
        if name == "xla_bf16" and harness:
            res["loop_s"] = timer.loop(single, sets, res["rounds"] * res["sets"])
        row["impls"][name] = res
        del out, val
    row["sets"] = {name: sets_needed[name] for name in impl_names}
    keep = dict(ours_out=outs0.get("ours_fg"), ref=ref)
    return row, keep


def _table(rows, dg_on):
    head = ["M", "N", "K", "ours-fg", "DeepGEMM", "ours/DG", "ours-pt", "XLA-FP8",
            "pt/XLA-FP8", "ours-1d1d", "XLA-BF16", "fg/BF16", "calc_diff"]
    lines = []
    for r in rows:
        t = {name: v.get("tflops") for name, v in r["impls"].items()}
        dg = r.get("deepgemm", {}).get("tflops") if dg_on else None
        lines.append([str(r["m"]), str(r["n"]), str(r["k"]),
                      _fmt_rate(t.get("ours_fg")), _fmt_rate(dg),
                      _fmt_ratio(_ratio(t.get("ours_fg"), dg)),
                      _fmt_rate(t.get("ours_pt")), _fmt_rate(t.get("xla_fp8_raw")),
                      _fmt_ratio(_ratio(t.get("ours_pt"), t.get("xla_fp8_raw"))),
                      _fmt_rate(t.get("ours_1d1d")), _fmt_rate(t.get("xla_bf16")),
                      _fmt_ratio(_ratio(t.get("ours_fg"), t.get("xla_bf16"))),
                      _fmt_diff(r["calc_diff"].get("ours_fg"))])
    widths = [max(len(h), *(len(ln[i]) for ln in lines)) if lines else len(h)
              for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    out = [fmt(head), fmt(["-" * w for w in widths])]
    out += [fmt(ln) for ln in lines]
    return "\n".join(out)


def _summary(rows, dg_on):
    by_shape = {(r["m"], r["n"], r["k"]): r for r in rows}
    tf = lambda s, name: by_shape.get(s, {}).get("impls", {}).get(name, {}).get("tflops")  # noqa: E731,E501
    summ, lines = {}, []

    def dg_ratios(key):
        out = []
        for s in DEEPSEEK:
            r = by_shape.get(s)
            if r is None or not r.get("deepgemm", {}).get(key):
                continue
            ours = tf(s, "ours_fg")
            theirs = r["flops"] / r["deepgemm"][key] / 1e12
            if ours:
                out.append((ours / theirs, s))
        return out

    for key, what in (("kineto_s", "[DeepGEMM timed as its tests do: kineto, L2 flushed]"),
                      ("rotated_s", "[DeepGEMM timed like ours: rotated sets, CUDA events]")):
        ratios = dg_ratios(key) if dg_on else []
        tag = "deepgemm" if key == "kineto_s" else "deepgemm_rotated"
        if ratios:
            g = _geomean([x for x, _ in ratios])
            lo, lo_s = min(ratios)
            summ[f"ours_fg_over_{tag}_geomean"] = g
            summ[f"ours_fg_over_{tag}_min"] = lo
            summ[f"ours_fg_over_{tag}_min_shape"] = list(lo_s)
            summ[f"ours_fg_over_{tag}_shapes"] = len(ratios)
            lines.append(f"ours-fg / DeepGEMM over {len(ratios)} of {len(DEEPSEEK)} DeepSeek "
                         f"shapes {what}: geomean {g:.3f}, min {lo:.3f} at "
                         f"{_shape_str(lo_s)}")
        else:
            lines.append(f"ours-fg / DeepGEMM {what}: n/a (not measured on the DeepSeek "
                         f"shapes)")
    for s in ((4096,) * 3, (8192,) * 3):
        # The target compares with XLA's FP8 dot itself (lax.dot_general on float8
        # operands: one cuBLASLt FP8 call); the dequantize-then-dot pattern is slower.
        raw = _ratio(tf(s, "ours_pt"), tf(s, "xla_fp8_raw"))
        scaled = _ratio(tf(s, "ours_pt"), tf(s, "xla_fp8"))
        summ[f"ours_pt_over_xla_fp8_raw_{s[0]}"] = raw
        summ[f"ours_pt_over_xla_fp8_{s[0]}"] = scaled
        lines.append(f"ours-pt / XLA FP8 dot at {s[0]}^3: {_fmt_ratio(raw)} "
                     f"(vs the dequantize-then-dot pattern: {_fmt_ratio(scaled)})")
    x = _ratio(tf((4096,) * 3, "ours_fg"), tf((4096,) * 3, "xla_bf16"))
    summ["ours_fg_over_xla_bf16_4096"] = x
    lines.append(f"ours-fg / XLA-BF16 at 4096^3: {_fmt_ratio(x)}")
    return summ, lines


def _harness_lines(rows):
    lines = ["Harness check, XLA BF16 dot, us per call: the rotated program (slope over "
             "rounds; plain t/calls) vs a Python loop of single jitted calls",
             f"{'shape':>16}  {'slope':>9}  {'plain':>9}  {'loop':>9}  loop/slope"]
    for r in rows:
        b = r["impls"].get("xla_bf16", {})
        if "loop_s" not in b:
            continue
        lines.append(f"{_shape_str((r['m'], r['n'], r['k'])):>16}  {_fmt_us(b['s']):>9}  "
                     f"{_fmt_us(b['plain_s']):>9}  {_fmt_us(b['loop_s']):>9}  "
                     f"{_fmt_ratio(b['loop_s'] / b['s'])}")
    return lines


def _xla_fp8_lines(rows):
    lines = ["XLA FP8 detail, TFLOP/s: scaled (dequant pattern, the table's XLA-FP8) / "
             "unscaled f8 dot; GEMM back ends in the compiled programs"]
    for r in rows:
        a, b = r["impls"].get("xla_fp8", {}), r["impls"].get("xla_fp8_raw", {})
        if not a and not b:
            continue
        lines.append(f"{_shape_str((r['m'], r['n'], r['k'])):>16}  "
                     f"{_fmt_rate(a.get('tflops')):>6} / {_fmt_rate(b.get('tflops')):<6} "
                     f"{','.join(a.get('targets', [])) or '?'} / "
                     f"{','.join(b.get('targets', [])) or '?'}")
    return lines


def _dg_lines(rows):
    lines = ["DeepGEMM method check, us per call: kineto (its tests: kernel only, L2 "
             "flushed) vs rotated sets with CUDA events; agreement with ours-fg",
             f"{'shape':>16}  {'kineto':>9}  {'rotated':>9}  {'diff vs ours':>12}  "
             f"{'diff vs f32':>11}"]
    for r in rows:
        d = r.get("deepgemm")
        if not d:
            continue
        if "error" in d:
            lines.append(f"{_shape_str((r['m'], r['n'], r['k'])):>16}  {d['error'][:90]}")
            continue
        flag = "" if d["diff_vs_ours"] < 1e-3 else "  MISMATCH (>= 1e-3)"
        lines.append(f"{_shape_str((r['m'], r['n'], r['k'])):>16}  {_fmt_us(d['kineto_s']):>9}"
                     f"  {_fmt_us(d.get('rotated_s')):>9}  {d['diff_vs_ours']:>12.1e}  "
                     f"{d['diff_vs_ref']:>11.1e}{flag}")
    return lines


def _write_json(path, meta, rows, summary):
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        if isinstance(x, (np.floating, np.integer)):
            return clean(x.item())
        return x

    with open(path, "w") as f:
        json.dump(clean(dict(meta=meta, shapes=rows, summary=summary)), f, indent=1)


def _plot(path, rows, dg_on):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _log(f"PNG: skipped (matplotlib is not installed), not written to {path}")
        return
    series = [("ours_fg", "ours fine-grained (1D2D)"), ("deepgemm", "DeepGEMM fp8_gemm_nt"),
              ("ours_pt", "ours per-tensor"), ("xla_fp8", "XLA FP8 dot (scaled)"),
              ("ours_1d1d", "ours 1D1D (f32 out)"), ("xla_bf16", "XLA BF16")]
    if not dg_on:
        series = [s for s in series if s[0] != "deepgemm"]
    labels = [_shape_str((r["m"], r["n"], r["k"])) for r in rows]
    x = np.arange(len(rows))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(8.0, 0.18 * len(rows) * len(series) + 2), 5))
    for i, (name, label) in enumerate(series):
        vals = []
        for r in rows:
            v = r.get("deepgemm", {}).get("tflops") if name == "deepgemm" else \
                r["impls"].get(name, {}).get("tflops")
            vals.append(v if v else 0.0)
        ax.bar(x + (i - (len(series) - 1) / 2) * width, vals, width, label=label)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("TFLOP/s")
    dev = jax.devices()[0]
    ax.set_title(f"Dense GEMM throughput, {dev.device_kind} (M x N x K)")
    ax.legend(fontsize=8, ncol=3)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    _log(f"PNG written to {path}")


def run_dense(args):
    dev = jax.devices()[0]
    on_gpu = dev.platform == "gpu"
    native = fg.has_fp8_support(dev)
    shapes = _parse_shapes(args.shapes, args.quick)
    impl_names = [n for n in IMPLS if n in args.impls]
    _log(f"jax {jax.__version__}, device {dev.device_kind} ({dev.platform}); "
         f"jax_fp8gemm {fg.__version__} from {os.path.dirname(fg.__file__)}; CUDA build "
         f"{fg.cuda_built()}; native FP8 kernels: {native}")
    if not native:
        _log("Note: no native FP8 kernels here (portable backend): ours' rates show "
             "correctness, not FP8 speed.")
    _log(f"{len(shapes)} shapes; implementations: {', '.join(impl_names)}")

    meta = dict(device=dev.device_kind, platform=dev.platform, jax=jax.__version__,
                jax_fp8gemm=fg.__version__, jax_fp8gemm_path=os.path.dirname(fg.__file__),
                native_fp8=native, argv=sys.argv[1:], quick=args.quick,
                method=dict(l2_bytes=args.l2_bytes, max_sets=args.max_sets,
                            target_calls=args.target_calls, max_program_s=args.max_program_s,
                            warmup=args.warmup, warmup_s=args.warmup_s,
                            repeats=args.repeats,
                            per_call="slope (t_L - t_1) / ((L - 1) R) of rotated programs",
                            xla_fp8="dequant pattern convert(fp8)->bf16 * scale, bf16 out; "
                                    "xla_fp8_raw: f8 x f8 -> bf16 with no scales",
                            deepgemm="kineto kernel time with L2 flush (its tests); "
                                     "rotated_s: rotated sets, CUDA events"))

    # DeepGEMM, phase 0: compile in child processes, probe that it works.
    dg_on, dg_failed = False, {}
    dg_shapes = [s for s in shapes if deepgemm_eligible(s)]
    if args.no_deepgemm:
        dg_note = "skipped (--no-deepgemm)"
    elif not on_gpu:
        dg_note = f"skipped (no CUDA GPU: JAX runs on {dev.platform})"
    else:
        dg_on, dg_failed, dg_note = deepgemm_prewarm(dg_shapes, args.deepgemm_timeout)
    _log(f"DeepGEMM: {dg_note}")
    meta["deepgemm"] = dg_note

    # Phase 1: JAX.
    timer = Timer(args)
    rows, keep = [], {}
    t_all = time.perf_counter()
    for i, shape in enumerate(shapes):
        t0 = time.perf_counter()
        try:
            row, kept = _bench_shape(shape, args, timer, impl_names, harness=True)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: go on with the rest
            _log(f"[{i + 1}/{len(shapes)}] {_shape_str(shape)}: FAILED {type(e).__name__}: "
                 f"{str(e).splitlines()[0][:300] if str(e) else ''}")
            rows.append(dict(m=shape[0], n=shape[1], k=shape[2], flops=2.0 * math.prod(shape),
                             impls={}, calc_diff={}, sets={"-": 0},
                             error=f"{type(e).__name__}: {e}"[:2000]))
            continue
        rows.append(row)
        if dg_on and shape in dg_shapes and "ours_fg" in impl_names:
            keep[shape] = kept
        rates = "  ".join(f"{IMPLS[nm][0]} {_fmt_rate(v.get('tflops'))}"
                          for nm, v in row["impls"].items())
        _log(f"[{i + 1}/{len(shapes)}] {_shape_str(shape)}: {rates} TFLOP/s  "
             f"(sets {max(row['sets'].values())}, {time.perf_counter() - t0:.1f} s)")
    _log(f"JAX phase: {time.perf_counter() - t_all:.0f} s")
    summary, _ = _summary(rows, False)
    _write_json(args.json, meta, rows, summary)

    # Phase 2: DeepGEMM, after every JAX measurement.
    if dg_on:
        try:
            import deep_gemm
            import torch
            dgb = DeepGEMM(deep_gemm, torch, args)
        except Exception as e:  # noqa: BLE001
            dg_on = False
            meta["deepgemm"] = dg_note = f"not importable ({e!r})"
            _log(f"DeepGEMM: {dg_note}")
    if dg_on:
        meta["deepgemm_version"] = getattr(deep_gemm, "__version__", "?")
        t_dg = time.perf_counter()
        for row in rows:
            shape = (row["m"], row["n"], row["k"])
            if not deepgemm_eligible(shape):
                row["deepgemm"] = dict(error="skipped: DeepGEMM needs K % 128 == 0")
                continue
            if shape in dg_failed:
                row["deepgemm"] = dict(error=f"failed in the compile phase: {dg_failed[shape]}")
                continue
            if keep.get(shape, {}).get("ours_out") is None:
                row["deepgemm"] = dict(error="skipped: no ours-fg output to compare with")
                continue
            try:
                raw = _make_inputs(shape, row["sets"]["ours_fg"], args.seed)
                prepared = [PREPS["fg"](a, b) for a, b in raw]
                del raw
                res = dgb.measure(shape, prepared, keep[shape]["ours_out"], keep[shape]["ref"])
                res["tflops"] = row["flops"] / res["kineto_s"] / 1e12
                res["rotated_tflops"] = row["flops"] / res["rotated_s"] / 1e12
                row["deepgemm"] = res
                del prepared
                _log(f"DeepGEMM {_shape_str(shape)}: {_fmt_rate(res['tflops'])} TFLOP/s "
                     f"(kineto), {_fmt_rate(res['rotated_tflops'])} (rotated); calc_diff vs "
                     f"ours {res['diff_vs_ours']:.1e}; first call {res['first_call_s']:.1f} s")
            except Exception as e:  # noqa: BLE001
                row["deepgemm"] = dict(error=f"{type(e).__name__}: {e}"[:2000])
                _log(f"DeepGEMM {_shape_str(shape)}: FAILED {type(e).__name__}: "
                     f"{str(e).splitlines()[0][:300] if str(e) else ''}")
            keep.pop(shape, None)
        _log(f"DeepGEMM phase: {time.perf_counter() - t_dg:.0f} s")
    keep.clear()

    summary, summary_lines = _summary(rows, dg_on)
    mismatches = [r for r in rows if r.get("deepgemm", {}).get("diff_vs_ours", 0) >= 1e-3]
    summary["deepgemm_mismatches"] = [[r["m"], r["n"], r["k"]] for r in mismatches]
    _write_json(args.json, meta, rows, summary)
    _log(f"JSON written to {args.json}")
    if args.png:
        try:
            _plot(args.png, rows, dg_on)
        except Exception as e:  # noqa: BLE001 - the plot is a convenience
            _log(f"PNG: failed ({e!r})")

    _log("")
    for line in _harness_lines(rows):
        _log(line)
    _log("")
    for line in _xla_fp8_lines(rows):
        _log(line)
    if dg_on:
        _log("")
        for line in _dg_lines(rows):
            _log(line)
    _log("")
    _log(f"TFLOP/s on {dev.device_kind}; DeepGEMM: {dg_note}; calc_diff: ours-fg vs the "
         f"float32 product of the unquantized inputs")
    _log(_table(rows, dg_on))
    for line in summary_lines:
        _log(line)
    if mismatches:
        _log("DeepGEMM and ours-fg DISAGREE (calc_diff >= 1e-3) at: "
             + ", ".join(_shape_str((r["m"], r["n"], r["k"])) for r in mismatches))
    bad = [r for r in rows
           if "ours_fg" in impl_names and not r["calc_diff"].get("ours_fg", 1.0) < 2e-3]
    if bad:
        _log("ours-fg calc_diff above 2e-3 (or missing) at: "
             + ", ".join(_shape_str((r["m"], r["n"], r["k"])) for r in bad))
    return 1 if (mismatches or bad) else 0


# ---------------------------------------------------------------------------------------
# Command line.


def _add_dense(sub):
    p = sub.add_parser("dense", help="dense GEMMs: ours (fine-grained, per-tensor, 1D1D) vs "
                                     "XLA BF16, XLA FP8 and DeepGEMM",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="three tiny shapes, 2 sets, 2 rounds: seconds on a CPU")
    p.add_argument("--shapes", nargs="+", metavar="SHAPE",
                   help="MxNxK, N (= NxNxN), or a group: deepseek (the 18 DeepSeek-V3 shapes), "
                        "square (2048, 4096, 8192, 2049 cubed), all (default), quick")
    p.add_argument("--json", default="bench_dense.json", help="where to write every number")
    p.add_argument("--png", default="bench_dense.png", help="bar plot ('' for none)")
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS),
                   help="JAX implementations to time (default all)")
    p.add_argument("--no-deepgemm", action="store_true", help="do not try DeepGEMM")
    p.add_argument("--deepgemm-timeout", type=float, default=480.0,
                   help="seconds for DeepGEMM's parallel kernel compilation (default 480)")
    add_timing_args(p, max_sets=32, target_calls=64, max_program_s=0.05)
    p.set_defaults(func=run_dense)


def dump_json(path, data):
    """Writes a subcommand's results (values JSON cannot hold become null)."""
    with open(path, "w") as f:
        json.dump(data, f, indent=1, default=lambda o: None)
    print(f"JSON written to {path}")


def add_timing_args(p, *, max_sets, target_calls, max_program_s):
    """The Timer's options (and --seed), shared by every subcommand; defaults per subcommand."""
    p.add_argument("--l2-bytes", type=float, default=200e6,
                   help="bytes one round over the input sets moves at least (default 200e6)")
    p.add_argument("--max-sets", type=int, default=max_sets,
                   help=f"input sets at most (default {max_sets})")
    p.add_argument("--target-calls", type=int, default=target_calls,
                   help=f"calls in the long timed program, at least (default {target_calls})")
    p.add_argument("--max-program-s", type=float, default=max_program_s,
                   help=f"seconds the long program runs, about, at most (default {max_program_s})")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs (default 2; 1 quick)")
    p.add_argument("--warmup-s", type=float, default=None,
                   help="seconds of untimed runs at least, after --warmup (default 0.1; 0 quick)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs, the median is kept (default 7; 3 quick)")
    p.add_argument("--seed", type=int, default=0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jax_fp8gemm.bench",
        description="jax_fp8gemm benchmarks (each subcommand has --help)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_dense(sub)
    from . import _bench_grouped  # (it imports this module)

    _bench_grouped.add_parser(sub)
    from . import _bench_train

    _bench_train.add_parser(sub)
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.warmup_s is None:
        args.warmup_s = 0.0 if args.quick else 0.1
    if args.repeats is None:
        args.repeats = 3 if args.quick else 7
    if args.warmup < 0 or args.warmup_s < 0 or args.repeats < 1 or args.max_sets < 2:
        parser.error("--warmup >= 0, --warmup-s >= 0, --repeats >= 1 and --max-sets >= 2")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

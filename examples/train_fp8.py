"""Train a small transformer language model with FP8 GEMMs and compare it with BF16.

    python examples/train_fp8.py                      # tiny defaults: well under a minute on a CPU
    python examples/train_fp8.py --steps 2000 --d-model 512 --layers 8 --heads 8 \\
        --seq 256 --batch 64                         # on a GPU

A decoder-only transformer (linen: token embedding, --layers pre-norm blocks of causal
self-attention and an MLP, final norm, output projection tied to the embedding) learns a
synthetic character-level corpus that the script generates itself: sentences from a small
grammar, with a little noise. It is trained twice, from the same init and with the same
batches in the same order:

  FP8   every Dense of the attention projections and the MLP is jax_fp8gemm.flax.FP8Dense
        (forward and both backward GEMMs in FP8, the DeepSeek-V3 fine-grained recipe)
  BF16  the same layers are flax.linen.Dense

Both compute in bfloat16 (dtype=jnp.bfloat16) with float32 params; the model takes the
Dense class as a field, so the class is the only difference. Optimizer: optax.adamw with
linear warmup and cosine decay; the train step is jax.jit'd.

Prints both losses every --log-every steps, then the final held-out losses, the relative
difference (fp8 - bf16) / bf16, the step times, and writes both loss curves to --png
(needs matplotlib; without it the plot is skipped with a message). --json writes all of
it as JSON. On a CPU the FP8 GEMMs run through the reference C++ backend: the FP8 step is
slower there, the comparison of the losses is what counts.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import flax.linen as nn

import jax_fp8gemm as fg
from jax_fp8gemm.flax import FP8Dense

# ---------------------------------------------------------------------------------------
# Data: a deterministic character-level corpus from a small grammar.

CHARSET = "\n .,;!?'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-"
SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the robot", "a small bird",
            "the teacher", "our neighbour"]
VERBS = ["sees", "likes", "chases", "finds", "paints", "follows", "hears", "builds"]
OBJECTS = ["the red ball", "a green box", "the river", "an apple", "the tall tree",
           "a paper boat", "the moon", "seven stones"]
ENDINGS = [" today.", " again.", " at night.", " slowly.", ".", "!"]


def make_corpus(n_chars: int, seed: int, noise: float = 0.02) -> str:
    """Sentences 'Subject verb object ending' picked at random (seeded), with `noise` of
    the characters replaced by random ones: learnable structure (words, grammar,
    capitals after a full stop) over an irreducible floor."""
    rng = np.random.default_rng(seed)
    parts, total = [], 0
    while total < n_chars:
        s = (f"{SUBJECTS[rng.integers(len(SUBJECTS))]} {VERBS[rng.integers(len(VERBS))]} "
             f"{OBJECTS[rng.integers(len(OBJECTS))]}{ENDINGS[rng.integers(len(ENDINGS))]}")
        s = s[0].upper() + s[1:] + ("\n" if rng.random() < 0.2 else " ")
        parts.append(s)
        total += len(s)
    chars = np.array(list("".join(parts)[:n_chars]))
    flip = rng.random(n_chars) < noise
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz "))
    chars[flip] = rng.choice(letters, size=int(flip.sum()))
    return "".join(chars)


def encode(text: str, vocab: int) -> np.ndarray:
    table = {c: i for i, c in enumerate(CHARSET[:vocab])}
    return np.array([table[c] for c in text], np.int32)


# ---------------------------------------------------------------------------------------
# Model. `dense` is the Dense class (FP8Dense or nn.Dense): the only difference of the runs.

class Block(nn.Module):
    d_model: int
    heads: int
    dense: Any
    dtype: Any = jnp.bfloat16

    @nn.compact
    def __call__(self, x):
        b, t, d = x.shape
        hd = d // self.heads
        h = nn.LayerNorm(dtype=self.dtype, name="ln1")(x)
        qkv = self.dense(3 * d, use_bias=False, dtype=self.dtype, name="qkv")(h)
        q, k, v = jnp.split(qkv.reshape(b, t, 3, self.heads, hd), 3, axis=2)
        q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]               # [B, T, H, hd]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(hd)
        causal = jnp.tril(jnp.ones((t, t), bool))
        probs = jax.nn.softmax(jnp.where(causal, logits, -1e9), axis=-1).astype(self.dtype)
        att = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d)
        x = x + self.dense(d, dtype=self.dtype, name="proj")(att)
        h = nn.LayerNorm(dtype=self.dtype, name="ln2")(x)
        h = nn.gelu(self.dense(4 * d, dtype=self.dtype, name="mlp_in")(h))
        return x + self.dense(d, dtype=self.dtype, name="mlp_out")(h)


class TransformerLM(nn.Module):
    vocab: int
    d_model: int
    layers: int
    heads: int
    seq: int
    dense: Any
    dtype: Any = jnp.bfloat16

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(self.vocab, self.d_model, dtype=self.dtype, name="embed")
        pos = self.param("pos", nn.initializers.normal(0.02), (self.seq, self.d_model))
        x = embed(tokens) + pos[: tokens.shape[1]].astype(self.dtype)
        for i in range(self.layers):
            x = Block(self.d_model, self.heads, self.dense, self.dtype, name=f"block{i}")(x)
        x = nn.LayerNorm(dtype=self.dtype, name="ln_f")(x)
        return embed.attend(x).astype(jnp.float32)                  # tied output projection


def loss_fn(params, model, tokens):
    logits = model.apply({"params": params}, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


# ---------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60, help="train steps (default 60; ~2000 on a GPU)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=len(CHARSET),
                   help=f"embedding rows (>= {len(CHARSET)}, the corpus' alphabet)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=None, help="default: steps / 10")
    p.add_argument("--png", default="train_fp8.png", help="loss curves ('' to skip)")
    p.add_argument("--json", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if min(args.steps, args.batch, args.seq, args.d_model, args.layers, args.heads) < 1:
        p.error("--steps, --batch, --seq, --d-model, --layers and --heads must be >= 1")
    if args.d_model % args.heads:
        p.error("--d-model must be a multiple of --heads")
    if args.vocab < len(CHARSET):
        p.error(f"--vocab must be >= {len(CHARSET)} (the corpus' alphabet)")
    if args.log_every is None:
        args.log_every = max(1, args.steps // 10)
    return args


def make_batches(data: np.ndarray, steps: int, batch: int, seq: int, seed: int) -> np.ndarray:
    """[steps, batch, seq + 1] windows at random (seeded) offsets: the same for both runs."""
    rng = np.random.default_rng(seed + 1)
    starts = rng.integers(0, len(data) - seq - 1, size=(steps, batch))
    return data[starts[..., None] + np.arange(seq + 1)]


def train(name, model, params, tx, batches, eval_batches, log):
    @jax.jit
    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, model, tokens)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    eval_loss = jax.jit(lambda p, tok: loss_fn(p, model, tok))
    opt_state = tx.init(params)
    t0 = time.perf_counter()
    compiled = step.lower(params, opt_state, batches[0]).compile()
    compile_s = time.perf_counter() - t0
    losses, times = [], []
    for i, tokens in enumerate(batches):
        t0 = time.perf_counter()
        params, opt_state, loss = compiled(params, opt_state, tokens)
        loss = float(loss)                                      # waits for the step
        times.append(time.perf_counter() - t0)
        losses.append(loss)
        log(name, i + 1, loss)
    final = float(np.mean([eval_loss(params, tok) for tok in eval_batches]))
    return {"losses": losses, "step_times": times, "compile_s": compile_s, "final_loss": final}


def main(argv=None) -> int:
    args = parse_args(argv)
    device = jax.devices()[0]
    print(f"Device: {device} ({device.platform}), FP8 support: {fg.has_fp8_support(device)}")

    n_eval = 4
    data = encode(make_corpus(max(200_000, 4 * args.batch * (args.seq + 1)), args.seed),
                  args.vocab)
    split = int(0.9 * len(data))
    batches = jnp.asarray(make_batches(data[:split], args.steps, args.batch, args.seq, args.seed))
    eval_batches = jnp.asarray(make_batches(data[split:], n_eval, args.batch, args.seq,
                                            args.seed + 7))
    print(f"Corpus: {len(data)} chars, sample: {make_corpus(60, args.seed)!r}")

    models = {name: TransformerLM(args.vocab, args.d_model, args.layers, args.heads,
                                  args.seq, dense)
              for name, dense in (("fp8", FP8Dense), ("bf16", nn.Dense))}
    params = models["bf16"].init(jax.random.key(args.seed), batches[0][:, :-1])["params"]
    # FP8Dense has nn.Dense's params: the FP8 model starts from the very same tree.
    fp8_shapes = jax.eval_shape(models["fp8"].init, jax.random.key(args.seed),
                                batches[0][:, :-1])["params"]
    assert jax.tree.structure(fp8_shapes) == jax.tree.structure(params)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"Model: {args.layers} layers, d_model {args.d_model}, {args.heads} heads, "
          f"seq {args.seq}, vocab {args.vocab}: {n_params:,} params; batch {args.batch}, "
          f"{args.steps} steps, log(vocab) = {math.log(args.vocab):.3f}")

    schedule = optax.warmup_cosine_decay_schedule(
        0.0, args.lr, warmup_steps=max(1, args.steps // 10), decay_steps=args.steps,
        end_value=args.lr * 0.1)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))

    def log(name, step, loss):
        if step % args.log_every == 0 or step == 1 or step == args.steps:
            print(f"[{name:>4}] step {step:5d}/{args.steps}  loss {loss:.4f}", flush=True)

    results = {}
    for name, model in models.items():
        results[name] = train(name, model, params, tx, batches, eval_batches, log)

    fp8, bf16 = results["fp8"]["final_loss"], results["bf16"]["final_loss"]
    rel = (fp8 - bf16) / bf16
    print(f"Final loss FP8: {fp8:.4f}")
    print(f"Final loss BF16: {bf16:.4f}")
    print(f"Relative difference (FP8 - BF16) / BF16: {rel:+.2%}")
    for name in ("fp8", "bf16"):
        r = results[name]
        steady = r["step_times"][1:] or r["step_times"]
        r["median_step_ms"] = 1e3 * statistics.median(steady)
        print(f"Step time {name.upper()}: {r['median_step_ms']:.1f} ms (median), "
              f"compile {r['compile_s']:.1f} s")

    if args.png:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed: skipping the plot (pip install matplotlib)")
        else:
            fig, ax = plt.subplots(figsize=(7, 4))
            steps = np.arange(1, args.steps + 1)
            for name, style in (("fp8", "-"), ("bf16", "--")):
                ax.plot(steps, results[name]["losses"], style,
                        label=f"{name.upper()} (held-out loss {results[name]['final_loss']:.3f})")
            ax.axhline(math.log(args.vocab), color="gray", lw=0.8, label="log(vocab)")
            ax.set_xlabel("step")
            ax.set_ylabel("train loss")
            ax.set_title(f"FP8 vs BF16: {args.layers}x{args.d_model} transformer LM")
            ax.legend()
            fig.tight_layout()
            fig.savefig(args.png, dpi=120)
            plt.close(fig)
            print(f"Wrote {args.png}")

    if args.json:
        out = {"args": vars(args), "relative_difference": rel, "device": str(device),
               **{k: v for k, v in results.items()}}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"Wrote {args.json}")

    if not (math.isfinite(fp8) and math.isfinite(bf16)):
        print("FAILED: non-finite loss", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark AROMA's train step against the floor and LoRA on random weights of a named shape.

    python experiments/bench.py --model roberta-base --batch 8 --seq 128 --json out.json

Measured in one process, interleaved (every variant once per round, several rounds), as the
median seconds per step after warm-up:

* floor      — the same model with only a trainable zero bias on every target module: the cost
               of back-propagating through all layers at all;
* aroma_r1   — AROMA r=1, nothing merged (fp32 kernels: merges fold into the kernel);
* aroma_r1_merged4 / merged16 — after 4 / 16 merges in every module (``_factors``: the same with
               folding off, so merged factors are applied every step, as for bf16 bases);
* aroma_r8, lora_r1, lora_r8;
* outer_step — one jitted outer step (eq. 6 for every module, merge, re-init, prune reset).

Also: train-step compiles and compile time, XLA's memory analysis of the compiled step,
trainable parameters and optimizer-state bytes. ``--smoke`` runs a tiny model for 2 steps
(CI checks that the script works; it never asserts timings).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aroma_jax import AromaConfig, AromaTrainer, controller, optim  # noqa: E402
from aroma_jax.hf import PRESETS  # noqa: E402

SHAPES = {
    "roberta-base": (
        "roberta",
        dict(
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            vocab_size=50265,
        ),
    ),
    "llama-small": (
        "llama",
        dict(
            hidden_size=512,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=4,
            intermediate_size=1536,
            vocab_size=8000,
        ),
    ),
    "tiny": (
        "roberta",
        dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            vocab_size=500,
        ),
    ),
}


def build(name: str, seq: int):
    import transformers as tf

    arch, kw = SHAPES[name]
    if arch == "roberta":
        cfg = tf.RobertaConfig(
            max_position_embeddings=seq + 4,
            num_labels=2,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            **kw,
        )
        model = tf.FlaxRobertaForSequenceClassification(cfg, seed=0)

        def loss_fn(params, batch, rng):
            logits = model(batch["input_ids"], batch["attention_mask"], params=params).logits
            return jnp.mean(
                optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
            )
    else:
        cfg = tf.LlamaConfig(max_position_embeddings=seq + 4, **kw)
        model = tf.FlaxLlamaForCausalLM(cfg, seed=0)

        def loss_fn(params, batch, rng):
            logits = model(batch["input_ids"], batch["attention_mask"], params=params).logits
            return jnp.mean(
                optax.softmax_cross_entropy_with_integer_labels(
                    logits[:, :-1], batch["input_ids"][:, 1:]
                )
            )

    return arch, model, loss_fn, cfg.vocab_size


def make_batch(vocab: int, batch: int, seq: int) -> dict:
    rng = np.random.default_rng(0)
    ids = rng.integers(3, vocab, (batch, seq)).astype(np.int32)
    return {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "labels": rng.integers(0, 2, batch).astype(np.int32),
    }


class Floor:
    """Zero biases on every target Dense output, trained with Adam (no adapters at all)."""

    def __init__(self, loss_fn, trainer: AromaTrainer, params):
        self.paths = trainer.paths
        self.params = params
        biases = {p: jnp.zeros((trainer.specs[p].fan_out,), jnp.float32) for p in self.paths}
        self.tx = optax.adam(1e-4)
        self.state = (biases, self.tx.init(biases))
        self.compiles = 0

        def interceptor(bias):
            def f(next_fun, args, kwargs, context):
                y = next_fun(*args, **kwargs)
                path = "/".join(map(str, context.module.path))
                if context.method_name == "__call__" and path in bias:
                    return y + bias[path].reshape(y.shape[-1:]).astype(y.dtype)
                return y

            return f

        def step(state, params, batch):
            self.compiles += 1
            biases, opt = state

            def loss(b):
                with nn.intercept_methods(interceptor(b)):
                    return loss_fn(params, batch, None)

            val, g = jax.value_and_grad(loss)(biases)
            upd, opt = self.tx.update(g, opt, biases)
            return (optax.apply_updates(biases, upd), opt), val

        self._step = jax.jit(step, donate_argnums=0)

    def __call__(self, batch):
        self.state, loss = self._step(self.state, self.params, batch)
        return loss


class Variant:
    def __init__(self, name, loss_fn, params, cfg: AromaConfig, merges: int = 0):
        self.name = name
        self.trainer = AromaTrainer(loss_fn, params, cfg)
        state = self.trainer.init(jax.tree.map(jnp.array, params))
        if merges:
            state = merge_n(self.trainer, state, merges)
        self.state = state

    def __call__(self, batch):
        self.state, info = self.trainer.step(self.state, batch)
        return info.loss


def merge_n(trainer: AromaTrainer, state, n: int):
    """``n`` real outer steps in every module (random non-zero pairs, outer_tol = 0)."""
    cfg = trainer.cfg.replace(outer_tol=0.0)

    @jax.jit
    def one(state, key):
        pairs = {
            p: pr._replace(b=0.01 * jax.random.normal(jax.random.fold_in(key, i), pr.b.shape))
            for i, (p, pr) in enumerate(sorted(state.adapters.pairs.items()))
        }
        adapters = state.adapters._replace(pairs=pairs)
        kernels = trainer.kernels(state.base)
        ctrl, adapters, new_k, _ = controller.outer_step(
            state.ctrl, adapters, kernels, trainer.specs, cfg, trainer.folded
        )
        base = state.base
        for p, k in new_k.items():
            base = _set(base, p.split("/") + ["kernel"], k.reshape(trainer.specs[p].kernel_shape))
        return state._replace(
            base=base, adapters=adapters, ctrl=ctrl._replace(inner_t=jnp.zeros((), jnp.int32))
        )

    for i in range(n):
        state = one(state, jax.random.key(100 + i))
    return state


def _set(tree, keys, value):
    out = dict(tree)
    out[keys[0]] = value if len(keys) == 1 else _set(tree[keys[0]], keys[1:], value)
    return out


def outer_step_timer(variant: Variant):
    trainer = variant.trainer

    @jax.jit
    def outer(state):
        kernels = trainer.kernels(state.base)
        ctrl, adapters, new_k, info = controller.outer_step(
            state.ctrl, state.adapters, kernels, trainer.specs, trainer.cfg, trainer.folded
        )
        trainable = {"pairs": adapters.pairs, "extra": state.extra}
        mask = jax.tree.map(lambda _: jnp.ones((), bool), trainable)
        opt = optim.reset(
            trainer.tx,
            state.opt_state,
            mask,
            ctrl.key,
            trainable,
            trainer.cfg.reset,
            trainer.cfg.prune_ratio,
        )
        return adapters, new_k, opt, info

    return lambda: outer(variant.state)


def block(x):
    return jax.block_until_ready(x)


class TorchVariant:
    """The same shape in PyTorch: HF PEFT LoRA (``r``), or ``r=0`` for the torch floor.

    The torch floor trains only the biases of the target Linear layers (the counterpart of our
    floor); PEFT variants train LoRA factors on the same target modules. AdamW, one step per call.
    """

    def __init__(self, arch: str, flax_cfg, flax_paths: list[str], r: int, batch: dict):
        import torch
        import transformers as tf

        torch.manual_seed(0)
        if arch != "roberta":
            raise SystemExit("--vs-peft supports the roberta shapes")
        cfg = tf.RobertaConfig(**flax_cfg.to_dict())
        model = tf.RobertaForSequenceClassification(cfg).train()
        targets = sorted({p.replace("/", ".") for p in flax_paths})
        if r:
            import peft

            lcfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets)
            model = peft.get_peft_model(model, lcfg)
        else:
            for name, prm in model.named_parameters():
                prm.requires_grad = any(name == t + ".bias" for t in targets)
        self.model = model
        params = [q for q in model.parameters() if q.requires_grad]
        self.trainable = sum(q.numel() for q in params)
        self.opt = torch.optim.AdamW(params, lr=1e-4)
        self.batch = {
            "input_ids": torch.as_tensor(batch["input_ids"], dtype=torch.long),
            "attention_mask": torch.as_tensor(batch["attention_mask"], dtype=torch.long),
            "labels": torch.as_tensor(batch["labels"], dtype=torch.long),
        }
        self.compiles = 0

    def __call__(self, batch):
        del batch  # the torch tensors were made once
        self.opt.zero_grad(set_to_none=True)
        loss = self.model(**self.batch).loss
        loss.backward()
        self.opt.step()
        return jnp.asarray(loss.item())


def bench(args) -> dict:
    arch, model, loss_fn, vocab = build(args.model, args.seq)
    params = model.params
    batch = make_batch(vocab, args.batch, args.seq)
    targets = PRESETS[arch]
    base = dict(
        target_modules=targets,
        max_steps=10**6,
        inner_max_steps=10**6,
        warmup_steps=0,
        rewarmup_steps=0,
    )
    aroma = AromaConfig(r=1, alpha=2.0, rank_capacity=32, **base)
    variants = {
        "aroma_r1": (aroma, 0),
        "aroma_r1_merged4": (aroma, 4),
        "aroma_r1_merged16": (aroma, 16),
        "aroma_r1_merged16_factors": (aroma.replace(fold="never"), 16),
        "aroma_r8": (aroma.replace(r=8, alpha=16.0, rank_capacity=4), 0),
        "lora_r1": (aroma.replace(method="lora"), 0),
        "lora_r8": (aroma.replace(method="lora", r=8, alpha=16.0), 0),
    }
    if args.smoke:
        variants = {k: v for k, v in variants.items() if k in ("aroma_r1", "lora_r8")}
    elif args.variants:
        unknown = sorted(set(args.variants) - set(variants))
        if unknown:
            raise SystemExit(f"unknown --variants {unknown}; choose from {sorted(variants)}")
        variants = {k: v for k, v in variants.items() if k in args.variants or k == "aroma_r1"}
    runners, compile_s = {}, {}
    print(
        f"building {len(variants) + 1} variants of {args.model} "
        f"(batch {args.batch}, seq {args.seq}) ...",
        flush=True,
    )
    for name, (cfg, merges) in variants.items():
        runners[name] = Variant(name, loss_fn, params, cfg, merges)
    runners["floor"] = Floor(loss_fn, runners["aroma_r1"].trainer, params)
    if args.vs_peft:
        import torch

        torch.set_num_threads(max(1, len(__import__("os").sched_getaffinity(0))))
        paths = runners["aroma_r1"].trainer.paths
        for name, r in (("torch_floor", 0), ("peft_lora_r1", 1), ("peft_lora_r8", 8)):
            runners[name] = TorchVariant(arch, model.config, paths, r, batch)
    for name, run in runners.items():
        t = time.perf_counter()
        block(run(batch))
        compile_s[name] = time.perf_counter() - t
        print(f"  {name:28s} first step (compile) {compile_s[name]:7.2f}s", flush=True)
    for _ in range(args.warmup):
        for run in runners.values():
            block(run(batch))
    times: dict[str, list[float]] = {k: [] for k in runners}
    for r in range(args.rounds):
        for name, run in runners.items():
            t = time.perf_counter()
            for _ in range(args.steps):
                out = run(batch)
            block(out)
            times[name].append((time.perf_counter() - t) / args.steps)
        print(
            f"  round {r + 1}/{args.rounds}: "
            + ", ".join(f"{k}={v[-1] * 1e3:.0f}ms" for k, v in times.items()),
            flush=True,
        )
    med = {k: statistics.median(v) for k, v in times.items()}
    outer = outer_step_timer(runners["aroma_r1"])
    block(outer())
    ot = []
    for _ in range(max(3, args.rounds)):
        t = time.perf_counter()
        block(outer())
        ot.append(time.perf_counter() - t)
    a1 = runners["aroma_r1"]
    step_fn = a1.trainer._step
    mem = step_fn.lower(a1.state, batch).compile().memory_analysis()
    trainable = {"pairs": a1.state.adapters.pairs, "extra": a1.state.extra}
    opt_bytes = sum(x.nbytes for x in jax.tree.leaves(a1.state.opt_state))
    result = {
        "device": f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}",
        "model": args.model,
        "batch": args.batch,
        "seq": args.seq,
        "target_modules": len(a1.trainer.paths),
        "floor_s": med["floor"],
        **{f"{k}_s": v for k, v in med.items() if k != "floor"},
        "outer_step_s": statistics.median(ot),
        "variants": list(med),
        "ratios_to_floor": {k: v / med["floor"] for k, v in med.items()},
        # Each round times every variant back to back, so per-round ratios cancel the machine's
        # slow drifts; their median is the figure to quote on a shared machine.
        "paired_ratios_to_floor": {
            k: statistics.median(t / f for t, f in zip(v, times["floor"], strict=True))
            for k, v in times.items()
        },
        "round_ms": {k: [round(t * 1e3, 1) for t in v] for k, v in times.items()},
        "train_step_compiles": {
            k: getattr(r, "trainer", r).compiles
            for k, r in runners.items()
            if not isinstance(r, TorchVariant)
        },
        "compile_s": compile_s,
        "peak_memory_bytes": {
            "argument": int(mem.argument_size_in_bytes),
            "output": int(mem.output_size_in_bytes),
            "temp": int(mem.temp_size_in_bytes),
        },
        "trainable_params": {
            k: int(
                r.trainable
                if isinstance(r, TorchVariant)
                else sum(x.size for x in jax.tree.leaves({"pairs": r.state.adapters.pairs}))
            )
            for k, r in runners.items()
            if k != "floor"
        },
        "aroma_r1_trainable_with_head": int(sum(x.size for x in jax.tree.leaves(trainable))),
        "optimizer_state_bytes_aroma_r1": int(opt_bytes),
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "date": datetime.date.today().isoformat(),
        "commit": _commit(),
        "cpu": _cpu(),
    }
    return result


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:
        return "unknown"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" x{jax.local_device_count()} devices"
    except OSError:
        pass
    return platform.processor()


def markdown(r: dict) -> str:
    rows = [
        "| variant | ms / step | x floor | x floor, paired by round | trainable params |",
        "|---|---:|---:|---:|---:|",
    ]
    floor = r["floor_s"]
    names = r["variants"]
    for n in names:
        s = r[f"{n}_s"]
        rows.append(
            f"| {n} | {s * 1e3:.1f} | {s / floor:.3f} | {r['paired_ratios_to_floor'][n]:.3f} | "
            f"{r['trainable_params'].get(n, 0):,} |"
        )
    rows.append(
        f"| outer step (all modules) | {r['outer_step_s'] * 1e3:.1f} | "
        f"{r['outer_step_s'] / floor:.3f} | | |"
    )
    return "\n".join(rows)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        choices=sorted(SHAPES),
        default="roberta-base",
        help="the shape to build with random weights (no download)",
    )
    p.add_argument("--batch", type=int, default=8, help="batch size")
    p.add_argument("--seq", type=int, default=128, help="sequence length")
    p.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median taken)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up steps per variant")
    p.add_argument(
        "--variants",
        nargs="+",
        metavar="NAME",
        help="time only these variants (aroma_r1 and the floor always run); default: all",
    )
    p.add_argument("--json", type=Path, help="write the results as JSON here")
    p.add_argument("--md", type=Path, help="write the markdown table here")
    p.add_argument(
        "--vs-peft",
        action="store_true",
        help="also time the same shape in PyTorch: HF PEFT LoRA r=1 and r=8, and a torch floor "
        "(target biases only); needs torch and peft installed",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny model, 2 steps, 1 round: checks that the script works (CI)",
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.batch, args.seq, args.steps, args.rounds, args.warmup = (
            "tiny",
            2,
            16,
            1,
            2,
            0,
        )
    result = bench(args)
    table = markdown(result)
    print("\n" + table)
    print(f"\ncompiles per variant: {result['train_step_compiles']}")
    print(f"memory (aroma_r1 step): {result['peak_memory_bytes']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.md:
        args.md.write_text(table + "\n")
    return result


if __name__ == "__main__":
    main()

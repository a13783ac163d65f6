"""Benchmark AROMA's train step against the floor and LoRA on random weights of a named shape.

    python -m experiments.bench --model roberta-base --batch 8 --seq 128 --json out.json

Measured in one process, interleaved (every variant once per round, several rounds), as the
median seconds per step after warm-up:

* floor      — the same model with only a trainable zero bias on every target module: the cost
               of back-propagating through all layers at all;
* aroma_r1   — AROMA r=1, nothing merged (fp32 kernels: merges fold into the kernel);
* aroma_r1_merged4 / merged16 — after 4 / 16 merges in every module (``_factors``: the same with
               folding off, so merged factors are applied every step, as for bf16 bases);
* aroma_r8, lora_r1, lora_r8;
* dora_r8, adalora_r8 — the rivals in the same step machinery: DoRA r=8 (magnitude and
               column norms from factors) and AdaLoRA from rank 12 to an average of 8 (rank
               allocation inside the step), both at alpha 16;
* outer_step — one jitted outer step (eq. 6 for every module, merge, re-init, prune reset).

Also, per variant: train-step compiles, trace and XLA compile time, XLA's memory analysis of
the compiled step, trainable parameters and optimizer-state bytes; the floor's model FLOPs
(analytic, cross-checked against XLA's count), FLOP rate and model-FLOPs utilisation (peak from
a table of GPUs/TPUs or ``--peak-tflops``); the allocator's peak where the device reports one.
``--vs-peft`` adds HF PEFT LoRA r=1/r=8 and a torch floor in PyTorch. ``--smoke`` runs every
variant on a tiny model for 2 steps (CI checks that the script works; it never reads timings).

On a GPU: ``python -m experiments.bench --dtype bfloat16 --batch 32 --seq 512 --json gpu.json``.

``--input-wait`` measures the input pipeline instead (`aroma_jax.train.input.BatchStream` over a
synthetic tokenized split of ``--input-rows`` rows, AROMA r=1 steps): the share of step time
spent waiting until the next batch is on its device, without prefetch (rows gathered and
copied when the step asks for them) and with it (grain threads gather ahead, two batches
already on the device), e.g. on the demo's shape:
``python -m experiments.bench --input-wait --model minilm --batch 16 --seq 32``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from aroma_jax import AromaConfig, AromaTrainer
from aroma_jax.core import controller, optim
from aroma_jax.models.hf import PRESETS, hf_flax_available
from aroma_jax.train import throughput
from experiments.shapes import SHAPES, of_arch

SHAPES = {name: SHAPES[name] for name in of_arch("roberta", "llama")}  # what `build` builds


def roberta_config(kw: dict, seq: int) -> dict:
    """An HF RoBERTa ``config.json`` dict of the shape (`experiments.shapes`), positions sized
    for ``seq`` tokens, two labels, no dropout."""
    return dict(
        model_type="roberta",
        **{**kw, "max_position_embeddings": seq + 4},
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def build(name: str, seq: int, dtype: str = "float32", impl: str = "native"):
    """The named shape, random weights; ``dtype``: the computation dtype (params stay fp32).
    ``impl``: the native model (`aroma_jax.models.native`: encoder or causal LM, unrolled) or
    HF's Flax class (transformers 4.x; for LLaMA, `FixedFlaxLlamaForCausalLM`)."""
    arch, kw = SHAPES[name]
    dt = jnp.dtype(dtype)
    if arch == "roberta":
        cfg_dict = roberta_config(kw, seq)
        if impl == "native":
            from aroma_jax.models.native.bert import EncoderConfig
            from aroma_jax.models.native.encoder_model import NativeEncoder

            cfg = EncoderConfig.from_dict(cfg_dict)
            model = NativeEncoder(cfg, seed=0, dtype=dt)
        else:
            import transformers as tf

            cfg = tf.RobertaConfig(**{k: v for k, v in cfg_dict.items() if k != "model_type"})
            model = tf.FlaxRobertaForSequenceClassification(cfg, seed=0, dtype=dt)

        def loss_fn(params, batch, rng):
            logits = model(batch["input_ids"], batch["attention_mask"], params=params).logits
            return jnp.mean(
                optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
            )
    else:
        cfg_dict = {**kw, "model_type": "llama", "max_position_embeddings": seq + 4}
        if impl == "native":
            from aroma_jax.models.native import NativeCausalLM, NativeConfig

            cfg = NativeConfig.from_dict(cfg_dict)
            model = NativeCausalLM(cfg, seed=0, dtype=dt)
        else:
            import transformers as tf

            from aroma_jax.models.llama import FixedFlaxLlamaForCausalLM

            cfg = tf.LlamaConfig(**{k: v for k, v in cfg_dict.items() if k != "model_type"})
            model = FixedFlaxLlamaForCausalLM(cfg, seed=0, dtype=dt)  # HF's, defects fixed

        def loss_fn(params, batch, rng):
            logits = model(batch["input_ids"], batch["attention_mask"], params=params).logits
            return jnp.mean(
                optax.softmax_cross_entropy_with_integer_labels(
                    logits[:, :-1], batch["input_ids"][:, 1:]
                )
            )

    return arch, model, loss_fn, cfg.vocab_size


# The floor trains no weight: its model FLOPs are the frozen-weight step's count, the one the
# runner's MFU uses (`aroma_jax.train.throughput`); peaks come from the same table.
floor_model_flops = throughput.model_flops
peak_tflops = throughput.peak_tflops


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

    def lower(self, batch):
        return self._step.lower(self.state, self.params, batch)

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

    @property
    def compiles(self) -> int:
        return self.trainer.compiles

    def lower(self, batch):
        return self.trainer._step.lower(self.state, batch)

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

    The torch floor adds a trainable zero bias to the output of every target Linear layer
    through a forward hook and trains only those (our floor, exactly); PEFT variants train LoRA
    factors on the same target modules. AdamW, one step per call, on CUDA when torch sees a GPU;
    ``dtype="bfloat16"`` runs under bf16 autocast, as our ``--dtype bfloat16`` computes in bf16.
    """

    def __init__(self, arch, flax_cfg, flax_paths: list[str], r: int, batch: dict, dtype: str):
        import torch
        import transformers as tf

        torch.manual_seed(0)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if arch == "roberta":
            hf_cfg = flax_cfg.to_dict() if hasattr(flax_cfg, "to_dict") else flax_cfg.hf_dict
            model = tf.RobertaForSequenceClassification(tf.RobertaConfig(**hf_cfg))
            labels = batch["labels"]
        else:
            hf_cfg = flax_cfg.to_dict() if hasattr(flax_cfg, "to_dict") else flax_cfg.hf_dict
            model = tf.LlamaForCausalLM(tf.LlamaConfig(**hf_cfg))
            labels = batch["input_ids"]  # the model shifts them, as our causal-LM loss does
        model = model.to(self.device).train()
        # HF's Flax and torch models share module paths (roberta.encoder.layer.0...).
        targets = sorted({p.replace("/", ".") for p in flax_paths})
        if r:
            import peft

            lcfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets)
            model = peft.get_peft_model(model, lcfg)
            params = [q for q in model.parameters() if q.requires_grad]
        else:
            model.requires_grad_(False)
            modules = dict(model.named_modules())
            params = []
            for t in targets:
                bias = torch.nn.Parameter(torch.zeros(modules[t].out_features, device=self.device))
                modules[t].register_forward_hook(lambda m, i, out, bias=bias: out + bias)
                params.append(bias)
        self.model = model
        self.trainable = sum(q.numel() for q in params)
        self.opt = torch.optim.AdamW(params, lr=1e-4)
        self.autocast = torch.autocast(self.device, torch.bfloat16, enabled=dtype == "bfloat16")
        self.batch = {
            "input_ids": torch.as_tensor(batch["input_ids"], dtype=torch.long),
            "attention_mask": torch.as_tensor(batch["attention_mask"], dtype=torch.long),
            "labels": torch.as_tensor(labels, dtype=torch.long),
        }
        self.batch = {k: v.to(self.device) for k, v in self.batch.items()}
        self.compiles = 0

    def __call__(self, batch):
        del batch  # the torch tensors were made once
        self.opt.zero_grad(set_to_none=True)
        with self.autocast:
            loss = self.model(**self.batch).loss
        loss.backward()
        self.opt.step()
        return jnp.asarray(loss.item())  # .item() waits for the device


def compile_stats(run, batch) -> dict:
    """Lowers and compiles ``run``'s step ahead of its first call (jit's caches keep both, so
    the first call neither traces nor compiles again) and reads XLA's analyses of it."""
    t0 = time.perf_counter()
    lowered = run.lower(batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {
        "trace_lower_s": t1 - t0,
        "xla_compile_s": t2 - t1,
        "memory_bytes": {
            "argument": int(mem.argument_size_in_bytes),
            "output": int(mem.output_size_in_bytes),
            "alias": int(mem.alias_size_in_bytes),
            "temp": int(mem.temp_size_in_bytes),
        },
        "xla_flops": float((cost or {}).get("flops", float("nan"))),
    }


def bench(args) -> dict:
    arch, model, loss_fn, vocab = build(args.model, args.seq, args.dtype, args.impl)
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
        "dora_r8": (aroma.replace(method="dora", r=8, alpha=16.0), 0),
        # AdaLoRA's budget table has max_steps + 1 entries: a finite schedule, as a real run.
        "adalora_r8": (
            aroma.replace(method="adalora", init_r=12, target_r=8, alpha=16.0, max_steps=10_000),
            0,
        ),
    }
    if args.variants:
        unknown = sorted(set(args.variants) - set(variants))
        if unknown:
            raise SystemExit(f"unknown --variants {unknown}; choose from {sorted(variants)}")
        variants = {k: v for k, v in variants.items() if k in args.variants or k == "aroma_r1"}
    print(
        f"building {len(variants) + 1} variants of {args.model} "
        f"(batch {args.batch}, seq {args.seq}, {args.dtype}) on {jax.devices()[0]} ...",
        flush=True,
    )
    runners = {name: Variant(name, loss_fn, params, cfg, m) for name, (cfg, m) in variants.items()}
    runners["floor"] = Floor(loss_fn, runners["aroma_r1"].trainer, params)
    if arch == "roberta" and args.impl == "native" and hf_flax_available() and not args.no_hf:
        # HF's Flax class on the same params (the trees agree): the same step, side by side
        _, _, hf_loss, _ = build(args.model, args.seq, args.dtype, "hf")
        runners["hf_flax_aroma_r1"] = Variant("hf_flax_aroma_r1", hf_loss, params, aroma, 0)
        runners["hf_flax_floor"] = Floor(hf_loss, runners["hf_flax_aroma_r1"].trainer, params)
    if args.vs_peft:
        import torch

        torch.set_num_threads(max(1, len(__import__("os").sched_getaffinity(0))))
        paths = runners["aroma_r1"].trainer.paths
        for name, r in (("torch_floor", 0), ("peft_lora_r1", 1), ("peft_lora_r8", 8)):
            runners[name] = TorchVariant(arch, model.config, paths, r, batch, args.dtype)
    stats, first_step_s = {}, {}
    for name, run in runners.items():
        if hasattr(run, "lower"):
            stats[name] = compile_stats(run, batch)
        t = time.perf_counter()
        block(run(batch))
        first_step_s[name] = time.perf_counter() - t
        st = stats.get(name)
        took = (
            f"trace+lower {st['trace_lower_s']:6.2f}s  XLA compile {st['xla_compile_s']:6.2f}s  "
            if st
            else ""
        )
        print(f"  {name:26s} {took}first step {first_step_s[name]:6.2f}s", flush=True)
    for _ in range(args.warmup):
        for run in runners.values():
            block(run(batch))
    times: dict[str, list[float]] = {k: [] for k in runners}
    for r in tqdm.trange(args.rounds, desc="rounds", disable=args.smoke):
        for name, run in runners.items():
            t = time.perf_counter()
            for _ in range(args.steps):
                out = run(batch)
            block(out)
            times[name].append((time.perf_counter() - t) / args.steps)
        tqdm.tqdm.write(
            f"  round {r + 1}/{args.rounds}: "
            + ", ".join(f"{k}={v[-1] * 1e3:.0f}ms" for k, v in times.items())
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
    device = jax.devices()[0]
    model_flops = floor_model_flops(arch, model.config, args.batch, args.seq)
    peak = peak_tflops(device.device_kind, args.dtype, args.peak_tflops)
    floor_tflops = model_flops / med["floor"] / 1e12
    allocator = device.memory_stats() or {}
    jax_runners = {k: r for k, r in runners.items() if not isinstance(r, TorchVariant)}
    opt_bytes = {
        k: int(sum(x.nbytes for x in jax.tree.leaves(r.state.opt_state)))
        for k, r in jax_runners.items()
        if not isinstance(r, Floor)
    }
    result = {
        "device": f"{device.platform}: {device.device_kind}",
        "model": args.model,
        "batch": args.batch,
        "seq": args.seq,
        "dtype": args.dtype,
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
        "train_step_compiles": {k: r.compiles for k, r in jax_runners.items()},
        "compile_s": {k: st["trace_lower_s"] + st["xla_compile_s"] for k, st in stats.items()},
        "first_step_s": first_step_s,
        "compile_stats": stats,
        "peak_memory_bytes": stats["aroma_r1"]["memory_bytes"],
        "allocator_peak_bytes": allocator.get("peak_bytes_in_use"),
        "floor_model_flops": model_flops,
        "floor_xla_flops": stats["floor"]["xla_flops"],
        "floor_tflops_per_s": floor_tflops,
        "peak_tflops": peak,
        "floor_mfu": floor_tflops / peak if peak else None,
        "trainable_params": {
            k: int(
                r.trainable
                if isinstance(r, TorchVariant)
                else sum(x.size for x in jax.tree.leaves({"pairs": r.state.adapters.pairs}))
            )
            for k, r in runners.items()
            if not isinstance(r, Floor)
        },
        "optimizer_state_bytes": opt_bytes,
        "optimizer_state_bytes_aroma_r1": opt_bytes["aroma_r1"],
        "impl": args.impl,
        "native_vs_hf_flax": (
            {
                "floor": med["floor"] / med["hf_flax_floor"],
                "aroma_r1": med["aroma_r1"] / med["hf_flax_aroma_r1"],
            }
            if "hf_flax_floor" in med
            else None
        ),
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
    """The results as a markdown table, plus the floor's FLOP rate and MFU."""
    rows = [
        "| variant | ms / step | x floor | x floor, paired by round | trainable params "
        "| optimizer state | compile s | XLA temp MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    floor = r["floor_s"]
    for n in r["variants"]:
        s = r[f"{n}_s"]
        st = r["compile_stats"].get(n)
        opt = r["optimizer_state_bytes"].get(n)
        opt = f"{opt / 1e6:.2f} MB" if opt is not None else ""
        comp = f"{r['compile_s'][n]:.1f} | {st['memory_bytes']['temp'] / 1e6:.0f}" if st else " |"
        rows.append(
            f"| {n} | {s * 1e3:.1f} | {s / floor:.3f} | {r['paired_ratios_to_floor'][n]:.3f} | "
            f"{r['trainable_params'].get(n, 0):,} | {opt} | {comp} |"
        )
    rows.append(
        f"| outer step (all modules) | {r['outer_step_s'] * 1e3:.1f} | "
        f"{r['outer_step_s'] / floor:.3f} | | | | | |"
    )
    vs = r.get("native_vs_hf_flax")
    if vs:
        faster = "native" if vs["aroma_r1"] < 1 else "HF Flax"
        rows.append(
            f"\nnative / HF Flax step time: floor {vs['floor']:.3f}, aroma_r1 "
            f"{vs['aroma_r1']:.3f} ({faster} is faster; hf_flax_* rows: HF's Flax class on "
            "the same params, same batch, same rounds)"
        )
    mfu = f"{r['floor_mfu']:.1%}" if r["floor_mfu"] is not None else "n/a (no known peak)"
    rows.append(
        f"\nfloor: {r['floor_model_flops'] / 1e9:.4g} model GFLOP/step (XLA counts "
        f"{r['floor_xla_flops'] / 1e9:.4g}), {r['floor_tflops_per_s']:.4g} TFLOP/s, MFU {mfu}"
    )
    return "\n".join(rows)


def input_wait(args) -> dict:
    """Seconds per step and the share of it spent waiting for the input, per pipeline mode,
    alternating the modes for ``args.rounds`` rounds of ``args.steps`` timed steps."""
    from aroma_jax.train.input import BatchStream

    arch, model, loss_fn, vocab = build(args.model, args.seq, args.dtype)
    rng = np.random.default_rng(0)
    n, seq = args.input_rows, args.seq
    arrays = {
        "input_ids": rng.integers(0, vocab, (n, seq)).astype(np.int32),
        "attention_mask": np.ones((n, seq), np.int32),
        "labels": rng.integers(0, 2, n).astype(np.int32),
    }
    cfg = AromaConfig(
        r=1,
        alpha=2.0,
        rank_capacity=32,
        target_modules=PRESETS[arch],
        max_steps=10**6,
        inner_max_steps=10**6,
        warmup_steps=0,
        rewarmup_steps=0,
    )
    trainer = AromaTrainer(loss_fn, model.params, cfg)
    state = trainer.init(model.params)
    modes = {"no_prefetch": (0, 0), "prefetch": (2, 2)}  # (batches on device ahead, threads)
    waits: dict = {m: [] for m in modes}
    totals: dict = {m: [] for m in modes}
    step = 0
    print(f"input wait: {args.model} batch {args.batch} seq {seq}, {n} rows", flush=True)
    for _ in range(args.rounds):
        for mode, (prefetch, threads) in modes.items():
            count = args.warmup + args.steps
            stream = BatchStream(arrays, args.batch, 0, None, step, step + count, prefetch, threads)
            for i in range(count):
                t0 = time.perf_counter()
                _, batch = next(stream)
                batch = jax.block_until_ready(jax.device_put(batch))  # on the device now
                t1 = time.perf_counter()
                state, info = trainer.step(state, batch)
                jax.block_until_ready(info)
                if i >= args.warmup:
                    waits[mode].append(t1 - t0)
                    totals[mode].append(time.perf_counter() - t0)
            step += count
    out = {}
    for mode in modes:
        out[mode] = {
            "step_s": statistics.median(totals[mode]),
            "input_wait_share": sum(waits[mode]) / sum(totals[mode]),
            "input_wait_ms_median": 1000 * statistics.median(waits[mode]),
        }
    return {
        "model": args.model,
        "batch": args.batch,
        "seq": seq,
        "rows": n,
        "steps_timed": args.rounds * args.steps,
        "device": str(jax.devices()[0].device_kind),
        "input_wait": out,
    }


def input_wait_markdown(r: dict) -> str:
    lines = [
        f"input wait, {r['model']} shape (random weights), batch {r['batch']}, seq {r['seq']}, "
        f"{r['rows']} rows, {r['steps_timed']} timed steps per mode on {r['device']}:",
        "",
        "| pipeline | median s/step | share of step time waiting for input | median wait |",
        "|---|---:|---:|---:|",
    ]
    for mode, v in r["input_wait"].items():
        lines.append(
            f"| {mode} | {v['step_s']:.4f} | {v['input_wait_share']:.1%} | "
            f"{v['input_wait_ms_median']:.2f} ms |"
        )
    return "\n".join(lines)


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
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="the model's computation dtype (params stay fp32, so merges fold into the kernels)",
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        help="the device's peak TFLOP/s for --dtype, for the floor's MFU (default: a table of "
        "GPUs and TPUs; none for CPUs)",
    )
    p.add_argument(
        "--impl",
        choices=["native", "hf"],
        default="native",
        help="our native model (default; for RoBERTa shapes with transformers 4.x installed, "
        "HF's Flax class runs beside it as hf_flax_floor / hf_flax_aroma_r1) or HF's Flax "
        "class (transformers 4.x)",
    )
    p.add_argument(
        "--no-hf", action="store_true", help="skip the HF Flax rows beside the native model"
    )
    p.add_argument("--json", type=Path, help="write the results as JSON here")
    p.add_argument("--md", type=Path, help="write the markdown table here")
    p.add_argument(
        "--vs-peft",
        action="store_true",
        help="also time the same shape in PyTorch: HF PEFT LoRA r=1 and r=8, and a torch floor "
        "(a zero bias per target module, as ours); needs torch and peft installed",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="a tiny model (--model tiny or tiny-llama; default tiny), 1 step per round, 2 rounds: "
        "checks that the script works (CI; never read its timings)",
    )
    p.add_argument(
        "--input-wait",
        action="store_true",
        help="measure the input pipeline's wait share without and with prefetch instead",
    )
    p.add_argument(
        "--input-rows",
        type=int,
        default=100_000,
        help="--input-wait: rows of the synthetic tokenized split",
    )
    args = p.parse_args(argv)
    if args.input_wait:
        if args.smoke:
            args.model, args.batch, args.seq, args.steps, args.rounds, args.warmup = (
                "tiny",
                2,
                16,
                2,
                1,
                1,
            )
            args.input_rows = 64
        result = input_wait(args)
        table = input_wait_markdown(result)
        print("\n" + table)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        if args.md:
            args.md.write_text(table + "\n")
        return result
    if args.smoke:
        args.model, args.batch, args.seq, args.steps, args.rounds, args.warmup = (
            args.model if args.model.startswith("tiny") else "tiny",
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

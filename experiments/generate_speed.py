"""Greedy generation on the native LLaMA model: with the KV cache against re-running the buffer.

    python -m experiments.generate_speed --out docs/generate-speed-cpu.json

Builds a random native model of a given shape (no weights are downloaded), left-pads a batch of
prompts, and times `NativeCausalLM.generate` with ``use_cache=True`` and ``use_cache=False``
side by side: each variant is compiled and run once untimed, then timed ``--repeats`` times,
alternating, and the median is reported with the tokens generated per second and the ratio.
Both variants must produce the same tokens (checked here, and by
``tests/models/test_native_generate.py``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from aroma_jax.models.native import NativeCausalLM, NativeConfig
from experiments.shapes import SHAPES, of_arch


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--model",
        choices=of_arch("llama"),
        default="llama-small",
        help="model shape (random weights)",
    )
    p.add_argument("--batch", type=int, default=8, help="prompts per batch")
    p.add_argument("--prompt", type=int, default=128, help="prompt length (left-padded)")
    p.add_argument("--new", type=int, default=32, help="new tokens per prompt")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant, alternating")
    p.add_argument("--scan", choices=("on", "off"), default="on", help="layers under nn.scan")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    cfg = NativeConfig.from_dict({"model_type": "llama", **SHAPES[args.model][1]})
    model = NativeCausalLM(cfg, seed=0, scan_layers=args.scan == "on")
    rng = np.random.default_rng(0)
    ids = rng.integers(1, cfg.vocab_size, (args.batch, args.prompt)).astype(np.int32)
    mask = np.ones_like(ids)
    for row in range(args.batch):  # prompts of different lengths, left-padded
        mask[row, : rng.integers(0, args.prompt // 2)] = 0

    def variant(use_cache: bool):
        fn = jax.jit(
            lambda params, ids, mask: (
                model.generate(
                    ids,
                    mask,
                    params=params,
                    max_new_tokens=args.new,
                    eos_token_id=-1,
                    use_cache=use_cache,
                ).sequences
            )
        )
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(model.params, ids, mask))
        return fn, time.perf_counter() - t0, np.asarray(out)

    fns, first, outs = {}, {}, {}
    for name, use in (("cache", True), ("no_cache", False)):
        fns[name], first[name], outs[name] = variant(use)
    if not np.array_equal(outs["cache"], outs["no_cache"]):
        raise SystemExit("the cached and uncached generations differ")
    times = {name: [] for name in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(model.params, ids, mask))
            times[name].append(time.perf_counter() - t0)
    tokens = args.batch * args.new
    result = {
        "model": args.model,
        "scan_layers": args.scan == "on",
        "batch": args.batch,
        "prompt": args.prompt,
        "new_tokens": args.new,
        "device": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "dtype": str(jnp.dtype(model.dtype)),
    }
    for name, ts in times.items():
        med = statistics.median(ts)
        result[name] = {
            "seconds_median": med,
            "seconds": ts,
            "tokens_per_s": tokens / med,
            "first_call_s": first[name],  # compile + one run
        }
        print(
            f"{name:9s} {med:7.3f} s  {tokens / med:8.1f} tokens/s  "
            f"(first call {first[name]:.1f} s)"
        )
    result["speedup"] = result["no_cache"]["seconds_median"] / result["cache"]["seconds_median"]
    print(f"KV cache speedup: {result['speedup']:.2f}x")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

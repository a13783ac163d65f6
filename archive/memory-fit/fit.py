"""Refit of `aroma_jax.train.memory` to XLA's accounting of the compiled train step (arguments +
temporaries + outputs - aliases, CPU backend) on the native models that `model.impl: auto` now
picks (scanned layers), on the shapes the constants were first fitted on: prints estimate / XLA
with the current constants, and the least-squares C_SCORES_DROPOUT (relative error) over the
shapes whose model takes the native encoder's attention-dropout path.

    cd <checkout> && PYTHONPATH=.:tests python archive/memory-fit/fit.py
"""

import sys
import tempfile

import numpy as np

SHAPES = [  # (model, batch, length, extra run-config overrides)
    ("tiny-roberta", 16, 128, []),
    ("tiny-roberta", 4, 255, []),
    ("tiny-roberta", 64, 32, ["aroma.method=lora", "aroma.r=8"]),
    ("tiny-llama", 8, 128, []),
    ("tiny-bart", 8, 96, ["task.name=bbc_headline"]),
]


def measure(name, batch, length, extra):
    import jax

    from aroma_jax.core.train_step import AromaTrainer
    from aroma_jax.train import memory, run_config
    from aroma_jax.train.pipeline import build_pipeline
    from aroma_jax.train.runner import batch_at

    cfg = run_config.resolve(
        {"model": {"name": name}},
        [f"task.max_len={length}", f"train.batch_size={batch}", "task.max_train_examples=64"]
        + ["task.max_eval_examples=8", *extra],
    )
    pipe = build_pipeline(cfg)
    trainer = AromaTrainer(pipe.loss_fn, pipe.params, pipe.aroma, stacked=pipe.stacked)
    shapes = jax.eval_shape(trainer.init, pipe.params)
    step_batch = batch_at(pipe.train_arrays, batch, 0, 0)
    ma = trainer._step.lower(shapes, step_batch).compile().memory_analysis()
    xla = (
        ma.argument_size_in_bytes
        + ma.temp_size_in_bytes
        + ma.output_size_in_bytes
        - ma.alias_size_in_bytes
    )
    lm = pipe.arch in memory.LM_ARCHS
    length = max(int(v.shape[1]) for v in step_batch.values() if getattr(v, "ndim", 0) == 2)
    est = memory.estimate(trainer, pipe.params, pipe.model.config, batch, length, 4, lm)
    dims = memory.model_dims(pipe.model.config)
    b, n, layers = batch, length, dims["layers"]
    # bytes per unit of C_SCORES_DROPOUT, and the rest of the estimate
    per_drop = 4 * layers * b * dims["heads"] * n * n * dims["attention_dropout_path"]
    rest = est.device - memory.C_SCORES_DROPOUT * per_drop
    return xla, est.device, per_drop, rest


def memory_constant():
    from aroma_jax.train import memory

    return memory.C_SCORES_DROPOUT


def main():
    import os

    import fake_assets

    os.environ["AROMA_DATA"] = str(fake_assets.make(__import__("pathlib").Path(tempfile.mkdtemp())))
    rows = []
    for name, batch, length, extra in SHAPES:
        xla, est, per_drop, rest = measure(name, batch, length, extra)
        rows.append((xla, per_drop, rest))
        print(f"{name} {batch}x{length} {extra}: XLA {xla / 2**20:.1f} MiB, estimate "
              f"{est / 2**20:.1f} MiB, ratio {est / xla:.3f}", flush=True)
    xla, per_drop, rest = (np.array(c, float) for c in zip(*rows, strict=True))
    on = per_drop > 0
    # minimise sum over the dropout-path shapes of ((rest + c * per_drop) / xla - 1)^2
    a = (per_drop / xla)[on]
    c = float(a @ (1 - rest / xla)[on] / (a @ a))
    print(f"least-squares C_SCORES_DROPOUT {c:.2f} (in use: {memory_constant()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

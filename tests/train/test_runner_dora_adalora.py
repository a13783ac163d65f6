"""`aroma-jax train` with ``method: dora | adalora`` on tiny-roberta: run, resume, exports."""

import json

import jax.numpy as jnp
import pytest

from aroma_jax import AromaTrainer, configs
from aroma_jax.examples.toy import batches, make_problem, toy_config
from aroma_jax.train import export, run_config, runner
from aroma_jax.train.checkpoint import CheckpointManager, arrays_equal

CONFIGS = configs.root()
FAST = [
    "train.progress=false",
    "task.max_train_examples=128",
    "task.max_eval_examples=16",
    "train.batch_size=8",
    "train.eval_every=100",
    "train.log_every=4",
    "train.save_every=6",
    "aroma.max_steps=16",
    "optimizer.warmup_steps=2",
]
METHODS = {
    "dora": ["aroma.method=dora", "aroma.r=2"],
    "adalora": [
        "aroma.method=adalora",
        "aroma.init_r=3",
        "aroma.target_r=1",
        "aroma.tinit=2",
        "aroma.tfinal=4",
        "aroma.delta_t=2",
    ],
}


def cfg(method):
    return run_config.load(CONFIGS / "tiny-roberta.yaml", FAST + METHODS[method])


# DoRA's run differs from AdaLoRA's only inside the trainer (tested in tests/core) and in its
# final tensors (tests/train/test_export_dora_adalora.py); one method keeps this test short.
@pytest.mark.slow  # a full AdaLoRA run through the runner, about 35 s (make test-slow)
@pytest.mark.parametrize("method", ["adalora"])
def test_run_and_peft_export(fake_assets, tmp_path, method):
    run = tmp_path / "run"
    s = runner.train(cfg(method), run)
    assert s["method"] == method and s["compiles"] == 1
    ranks = s["ranks"]
    if method == "adalora":  # pruned to the target budget: 1 per module on average
        assert sum(ranks.values()) == len(ranks)
    else:
        assert set(ranks.values()) == {2}
    out = export.export_peft(run, tmp_path / "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    if method == "dora":
        assert config["use_dora"] is True and config["peft_type"] == "LORA"
    else:
        assert config["peft_type"] == "ADALORA" and config["total_step"] == 16
        assert {k: sum(v) for k, v in config["rank_pattern"].items()} == {
            f"{p.replace('/', '.')}.lora_E": r for p, r in ranks.items() if r
        }


@pytest.mark.parametrize("method", sorted(METHODS))
def test_checkpoint_restores_the_method_state(tmp_path, method):
    # DoRA's column norms and AdaLoRA's EMAs and allocation live in the controller state.
    model, student, teacher = make_problem(0)

    def loss_fn(params, batch, rng):
        return jnp.mean((model.apply({"params": params}, batch["x"]) - batch["y"]) ** 2)

    extra = {"r": 2} if method == "dora" else dict(init_r=3, target_r=1, tinit=1, tfinal=2)
    acfg = toy_config().replace(method=method, max_steps=8, warmup_steps=0, **extra)
    trainer = AromaTrainer(loss_fn, student, acfg, donate=False)
    state = trainer.init(student)
    data = list(batches(teacher, model, 8, 6))
    for batch in data[:4]:
        state, _ = trainer.step(state, batch)
    with CheckpointManager(tmp_path / "ckpt", save_every=1) as ckpt:
        ckpt.save(4, state, {}, force=True)
        restored, _ = ckpt.restore(trainer.init(student))
    assert restored.ctrl.method_state is not None and arrays_equal(restored, state)
    for batch in data[4:]:
        state, _ = trainer.step(state, batch)
        restored, _ = trainer.step(restored, batch)
    assert arrays_equal(restored, state)

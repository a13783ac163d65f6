"""`aroma-jax train` on a mesh traces a native model's step under its logical-axis rules
(`partitioning.step_context`), so activations stay batch-sharded instead of being all-reduced
as partial sums over the fsdp-sharded width (docs/SCALE.md, docs/SHARDING.md)."""

import json

import jax
import numpy as np
import pytest

from aroma_jax import configs
from aroma_jax.core.train_step import AromaTrainer
from aroma_jax.train import run_config, runner

pytestmark = pytest.mark.slow  # two tiny-LLaMA runs and an extra compile: ~1 min on 2 cores

OVERRIDES = [
    "train.progress=false",
    "task.max_train_examples=64",
    "task.max_eval_examples=16",
    "train.batch_size=8",
    "train.eval_every=100",
    "train.eval_at_start=false",
    "train.log_every=2",
    "train.save_every=100",
    "aroma.max_steps=8",
    "aroma.inner_max_steps=4",
    "aroma.inner_check_every=2",
    "aroma.outer_tol=1e-4",
    "aroma.warmup_steps=2",
    "aroma.rewarmup_steps=2",
]


def _cfg(*extra):
    return run_config.load(configs.root() / "tiny-llama.yaml", OVERRIDES + list(extra))


def _train_losses(run):
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["split"] == "train"]


def _all_reduce_bytes(hlo: str) -> int:
    from experiments.scale_sim import collectives

    return collectives(hlo)["every_step"].get("all-reduce", {}).get("bytes", 0)


def test_native_step_on_a_mesh_is_traced_under_the_activation_rules(
    fake_assets, tmp_path, monkeypatch
):
    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    seen = {}
    step = AromaTrainer.step

    def spy(self, state, batch):
        if "pinned" not in seen:  # the program the runner's call runs, lowered in its context
            lowered = self._step.lower(state, batch)
            seen["text"] = lowered.as_text()
            seen["pinned"] = _all_reduce_bytes(lowered.compile().as_text())
            seen["trainer"] = self
            seen["args"] = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                (state, batch),
            )
        return step(self, state, batch)

    monkeypatch.setattr(AromaTrainer, "step", spy)
    meshed = runner.train(_cfg("mesh=fsdp=8"), tmp_path / "mesh")
    monkeypatch.setattr(AromaTrainer, "step", step)
    single = runner.train(_cfg(), tmp_path / "one")

    # The model's with_logical_constraint calls became sharding constraints (outside the
    # rules they are no-ops and the lowered step has none).
    n = seen["text"].count("sharding_constraint")
    # Without the rules (the runner before) the step all-reduces activation-sized partial sums.
    free = _all_reduce_bytes(seen["trainer"]._step.lower(*seen["args"]).compile().as_text())
    print(f"constraints {n}, all-reduce bytes per step: runner {seen['pinned']}, unpinned {free}")
    assert n >= 3, "no activation constraints traced"
    assert seen["pinned"] < free / 2, (seen["pinned"], free)
    assert meshed["compiles"] == 1  # every step ran in the same context: traced once
    assert meshed["ranks"] == single["ranks"] and meshed["outer_steps"] == single["outer_steps"]
    np.testing.assert_allclose(
        _train_losses(tmp_path / "mesh"), _train_losses(tmp_path / "one"), rtol=1e-5
    )


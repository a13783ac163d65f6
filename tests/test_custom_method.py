"""A method from outside the package (aroma_jax/examples/custom_method.py): registered, named by
a dotted path, trained end to end through ``aroma-jax train``."""

import json

import numpy as np
import pytest

from aroma_jax import AromaConfig, ConfigError, cli
from aroma_jax.core import methods
from aroma_jax.examples.custom_method import GrowWhileRatioHolds
from aroma_jax.examples.toy import toy_config, train_toy

DOTTED = "aroma_jax.examples.custom_method:GrowWhileRatioHolds"


def test_its_stop_rule_is_relative_to_the_first_pair():
    cfg = toy_config(method=DOTTED, max_steps=800, inner_max_steps=200, outer_tol=0.01)
    trainer, state, history = train_toy(cfg, steps=800)
    assert isinstance(trainer.method, GrowWhileRatioHolds) and trainer.compiles == 1
    first: dict[str, float] = {}
    stopped = 0
    for rec in history.outer_steps:
        m, rho = rec["module"], rec["rho_out"]
        if m not in first:  # the first pair merges, unless it never moved (then the floor stops it)
            assert rec["action"] == ("done" if rho == 0 else "merged"), rec
            first[m] = rho
            continue
        relative = rho < 0.5 * first[m]  # GrowWhileConfig.fraction's default
        below = relative or rho < cfg.outer_tol
        assert rec["action"] == ("done" if below else "merged"), (rec, first[m])
        stopped += relative and rho >= cfg.outer_tol  # stopped by the new rule alone
    assert stopped >= 1 and len(first) == len(trainer.paths)
    assert [r["action"] for r in history.outer_steps if r["module"] == "m0"] == ["done"]
    # The rule's state is each module's first ratio, carried on the device.
    kept = {p: float(v) for p, v in state.ctrl.method_state.items()}
    assert kept == pytest.approx(first, rel=1e-6)


def test_registered_under_a_name_and_refused_when_unknown():
    methods.register("grow-while-test", GrowWhileRatioHolds)
    cfg = AromaConfig(target_modules=("q",), method="grow-while-test")
    assert isinstance(cfg.plugin, GrowWhileRatioHolds) and cfg.grows
    with pytest.raises(ValueError, match="built in"):
        methods.register("aroma", GrowWhileRatioHolds)
    with pytest.raises(ConfigError, match="cannot import 'Nope'"):
        AromaConfig(target_modules=("q",), method="aroma_jax.examples.custom_method:Nope")
    with pytest.raises(ConfigError, match="lacks"):
        AromaConfig(target_modules=("q",), method="aroma_jax.examples.custom_method:jnp")


@pytest.mark.slow  # a tiny-roberta run through the CLI, about 40 s (make test-slow)
def test_trains_through_the_cli_by_dotted_path(fake_assets, tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--config", "tiny-roberta", "--output", str(out)]
    sets = [
        f"aroma.method={DOTTED}",
        "train.progress=false",
        "task.max_train_examples=128",
        "task.max_eval_examples=16",
        "train.batch_size=8",
        "train.eval_every=100",
        "train.log_every=4",
        "train.save_every=100",
        "aroma.max_steps=24",
        "optimizer.warmup_steps=2",
        "aroma.inner_max_steps=6",
        "optimizer.learning_rate=0.02",
    ]
    for s in sets:
        argv += ["--set", s]
    assert cli.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == DOTTED and summary["compiles"] == 1
    meta = json.loads((out / "final" / "meta.json").read_text())
    assert meta["method"] == DOTTED
    assert summary["outer_steps"] >= 2  # the rule ran at outer steps, not only at the end
    assert all(r >= 1 for r in summary["ranks"].values())  # the first pair always merges
    assert np.isfinite(summary["metrics"]["accuracy"])

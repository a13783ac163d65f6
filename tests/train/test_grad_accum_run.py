"""``train.grad_accum`` from the run config and the command line to the train step."""

import json

import numpy as np
import pytest

from aroma_jax import cli, configs
from aroma_jax.core.config import ConfigError
from aroma_jax.train import run_config, runner

FAST = [
    "train.progress=false",
    "train.eval_at_start=false",
    "task.max_train_examples=128",
    "task.max_eval_examples=16",
    "train.batch_size=8",
    "train.eval_every=100",
    "train.log_every=1",
    "train.save_every=100",
    "aroma.max_steps=16",
    "aroma.inner_max_steps=6",
    "aroma.inner_check_every=2",
    "aroma.outer_tol=1e-4",
    "aroma.warmup_steps=2",
    "aroma.rewarmup_steps=2",
]


def test_set_grad_accum_and_what_is_accepted():
    cfg = run_config.resolve({}, ["train.batch_size=16", "train.grad_accum=4"])
    assert cfg["train"]["grad_accum"] == 4
    assert run_config.resolve({}, [])["train"]["grad_accum"] == 1
    for bad in ("0", "-1", "3", "2.0", "true", "four"):
        with pytest.raises(ConfigError, match=r"train\.grad_accum=.*positive integer dividing"):
            run_config.resolve({}, ["train.batch_size=16", f"train.grad_accum={bad}"])


def test_cli_help_names_grad_accum(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["train", "--help"])
    assert done.value.code == 0
    assert "train.grad_accum=4" in " ".join(capsys.readouterr().out.split())


def train_losses(run):
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return np.array([r["loss"] for r in recs if r["split"] == "train"])


@pytest.mark.slow  # two tiny-llama runs
def test_a_run_with_grad_accum_4_is_the_run_without(fake_assets, tmp_path):
    """Multiple-choice LM training (padded target tokens, weighted by their count through the
    pipeline's ``loss_weight``): the same outer steps, ranks and held-out metrics, losses within
    float summation order, one compile."""
    name = configs.root() / "tiny-llama.yaml"
    one = runner.train(run_config.load(name, FAST), tmp_path / "k1")
    four = runner.train(run_config.load(name, FAST + ["train.grad_accum=4"]), tmp_path / "k4")
    assert four["compiles"] == one["compiles"] == 1
    assert four["ranks"] == one["ranks"]
    assert four["outer_steps"] == one["outer_steps"]
    a, b = train_losses(tmp_path / "k4"), train_losses(tmp_path / "k1")
    print(f"tiny-llama k=4 vs k=1: max relative loss difference {np.max(np.abs(a - b) / b):.2e}")
    np.testing.assert_allclose(a, b, rtol=1e-5)
    assert four["metrics"] == pytest.approx(one["metrics"], rel=1e-5)

"""``--profile START:STOP``: a JAX profiler trace of those steps in the run directory, and the
run's throughput record (steps/s, tokens/s; MFU only off CPU)."""

import gzip
import json
from pathlib import Path

import pytest

from aroma_jax import cli
from aroma_jax.train import run_config, runner, throughput

CONFIGS = Path(__file__).resolve().parents[2] / "aroma_jax" / "configs"
SHORT = [
    "train.progress=false",
    "task.max_train_examples=64",
    "task.max_eval_examples=8",
    "train.batch_size=8",
    "train.eval_every=100",
    "train.eval_at_start=false",
    "train.log_every=2",
    "train.save_every=100",
    "aroma.max_steps=6",
    "aroma.inner_max_steps=2",
    "aroma.inner_check_every=1",
    "aroma.outer_tol=1e-4",
    "optimizer.warmup_steps=1",
    "aroma.rewarmup_steps=1",
]


@pytest.mark.slow  # a short training run: minutes on a loaded 2-core machine
def test_profile_window_trace_and_throughput(fake_assets, tmp_path):
    cfg = run_config.load(CONFIGS / "tiny-roberta.yaml", SHORT)
    s = runner.train(cfg, tmp_path / "run", profile="2:5")
    assert s["profile"] == str(tmp_path / "run" / "profile")
    xplane = list((tmp_path / "run" / "profile").glob("plugins/profile/*/*.xplane.pb"))
    assert len(xplane) == 1  # what TensorBoard's profile plugin reads
    trace = throughput.trace_file(tmp_path / "run" / "profile")
    events = json.loads(gzip.open(trace).read())["traceEvents"]
    steps = [e for e in events if e.get("ph") == "X" and "_step_impl" in e.get("name", "")]
    assert len(steps) >= 3  # the three traced steps' dispatches (2:5 -> steps 3, 4, 5)
    ops = throughput.top_ops(trace, steps=3, n=5)
    assert len(ops) == 5 and ops[0]["ms_per_step"] >= ops[-1]["ms_per_step"] > 0
    assert 0 < sum(o["share"] for o in ops) <= 1
    assert not any(o["op"].startswith(("ThunkExecutor", "$")) for o in ops)

    t = s["throughput"]
    assert t["steps_per_s"] == pytest.approx(1000 / s["step_ms"], rel=1e-3)
    tokens = 8 * cfg.task.max_len
    assert t["tokens_per_s"] == pytest.approx(t["steps_per_s"] * tokens, rel=1e-3)
    assert t["model_flops_per_step"] > 0
    assert t["mfu"] is None and "not reported on CPU" in t["mfu_note"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["throughput"] == t


def test_model_flops_counts_every_matmul():
    """One layer, no attention length to speak of: the count is 2 x (forward + input grad)."""

    class Cfg:
        hidden_size, num_hidden_layers, intermediate_size = 4, 1, 8
        num_attention_heads, num_key_value_heads, vocab_size = 2, 2, 10

    # q, k, v, o (4 h*h), up, gate, down (3 h*inter), lm_head (h*vocab); 2 FLOPs per MAC;
    # forward + input gradient; attention: 2 products, 3x (forward + both gradients).
    dense = 2 * 1 * (4 * 16 + 3 * 32 + 40)
    attention = 2 * 2 * 1 * 1 * 1 * 4 * 1
    assert throughput.model_flops("llama", Cfg, batch=1, seq=1) == 2 * dense + 3 * attention
    assert throughput.model_flops("bart", Cfg, batch=1, seq=1) is None


def test_model_flops_of_bart_is_none_for_its_own_config():
    """BART's config names its width d_model (no hidden_size): the count says None, not a crash."""
    from aroma_jax.models.native.bart import BartConfig

    cfg = BartConfig(53, 16, 1, 1, 2, 2, 32, 32)
    assert not hasattr(cfg, "hidden_size")
    assert throughput.model_flops("bart", cfg, batch=2, seq=8) is None


@pytest.mark.parametrize("spec", ["5", "5:5", "7:3", "a:b", "1:x"])
def test_bad_profile_window_is_refused(spec, tmp_path, capsys):
    args = ["train", "--output", str(tmp_path / "x"), "--profile", spec]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "--profile" in err and "START:STOP" in err and len(err.strip().splitlines()) == 1

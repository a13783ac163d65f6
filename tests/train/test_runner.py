"""`aroma-jax train` end to end on tiny random models and stand-in data: run directory, resume,
bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from aroma_jax import configs
from aroma_jax.core.config import ConfigError
from aroma_jax.train import run_config, runner
from aroma_jax.train.checkpoint import CheckpointManager
from aroma_jax.train.hooks import Hook

CONFIGS = configs.root()
FAST = [
    "train.progress=false",
    "task.max_train_examples=256",
    "task.max_eval_examples=48",
    "train.batch_size=8",
    "train.eval_every=20",
    "train.log_every=4",
    "train.save_every=10",
    "aroma.max_steps=40",
    "aroma.inner_max_steps=8",
    "aroma.inner_check_every=4",
    "aroma.outer_tol=1e-4",
    "optimizer.warmup_steps=2",
    "aroma.rewarmup_steps=2",
]


def cfg(name="tiny-roberta", *extra):
    return run_config.load(CONFIGS / f"{name}.yaml", FAST + list(extra))


@pytest.fixture(scope="module")
def roberta_run(fake_assets, tmp_path_factory):
    """The default tiny-roberta run, uninterrupted: (directory, summary). Trained once for the
    tests that only read it (the run directory, the reference of the resume tests)."""
    run = tmp_path_factory.mktemp("roberta") / "run"
    return run, runner.train(cfg(), run)


@pytest.fixture(scope="module")
def llama_run(fake_assets, tmp_path_factory):
    """The default tiny-llama run on one device: (directory, summary), read only."""
    run = tmp_path_factory.mktemp("llama") / "one"
    return run, runner.train(cfg("tiny-llama"), run)


def test_tiny_roberta_run_directory(roberta_run, tmp_path):
    run, s = roberta_run
    for key in (
        "method",
        "metrics",
        "ranks",
        "total_rank",
        "adapter_params",
        "head_params",
        "outer_steps",
        "wall_s",
        "compiles",
    ):
        assert key in s
    assert s["compiles"] == 1 and s["outer_steps"] == 5 and "accuracy" in s["metrics"]
    assert (run / "plots" / "rank_growth.png").stat().st_size > 5000
    assert (run / "plots" / "rank_map.png").stat().st_size > 5000
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["split"] for r in records} == {"train", "validation", "test"}
    resolved = run_config.load(run / "config.yaml")
    assert resolved.aroma.target_modules and resolved.aroma.max_steps == 40
    assert list((run / "tb").iterdir())
    hist = json.loads((run / "history.json").read_text())
    assert hist["outer_steps"] and hist["inner_checks"]
    # eval and export from the run directory (what `aroma-jax eval/export RUN` do)
    assert runner.evaluate_only(resolved, run, "test") == s["metrics"]
    from aroma_jax.train import export

    peft_dir = export.export_peft(run, tmp_path / "peft")
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["modules_to_save"] == ["classifier"]
    # one definition of rank: summary, PEFT export and analysis (all from the finalized factors)
    assert sorted(config["rank_pattern"].values()) == sorted(r for r in s["ranks"].values() if r)
    from aroma_jax.analysis import summary as analysis
    from aroma_jax.analysis.runs import open_run

    modules = analysis.analyze_run(open_run(run))["modules"]
    assert {p: m["rank"] for p, m in modules.items()} == s["ranks"]
    assert s["distinct_ranks"] == sorted(set(s["ranks"].values()))
    last, stopped = s["final_pairs"], s["eq6_stopped"]
    assert last["merged"] + last["dropped"] + last["zero"] + stopped["during_training"] == len(
        s["ranks"]
    )
    assert stopped["modules"] == stopped["during_training"] + last["dropped"]
    assert sum(stopped["at_rank"].values()) == stopped["modules"]
    merged = export.export_merged(run, tmp_path / "merged")
    # tiny-roberta runs natively: PyTorch-layout safetensors
    assert (merged / "model.safetensors").exists() and (merged / "config.json").exists()


# right after an outer step (the slow tier: a longer run; tests/train/test_checkpoint.py resumes
# there too, at the trainer level) / inside an inner loop
@pytest.mark.parametrize("stop", [pytest.param(16, marks=pytest.mark.slow), 13])
def test_resume_is_bit_identical(roberta_run, tmp_path, stop):
    full = roberta_run[0]
    part = tmp_path / "part"
    # A user's hooks, through the interrupted and the resumed run: every 5 steps, and at outer
    # steps (with the synced infos: eq. 6's ratios are there to log).
    every5, outer = [], []
    hooks = [Hook(lambda loop: every5.append(loop.step), every=5)]
    outer_hooks = [lambda loop, infos: outer.extend(int(i.step) for i in infos if i.outer)]
    s = runner.train(cfg(), part, interrupt_at=stop, hooks=hooks, outer_hooks=outer_hooks)
    assert s["status"] == "interrupted" and s["step"] == stop
    runner.train(cfg(), part, resume=True, hooks=hooks, outer_hooks=outer_hooks)
    assert every5 == list(range(5, 41, 5))
    history = json.loads((full / "history.json").read_text())
    assert outer == sorted({r["step"] for r in history["outer_steps"]})
    a = load_file(str(full / "final" / "adapters.safetensors"))
    b = load_file(str(part / "final" / "adapters.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    sa = json.loads((full / "summary.json").read_text())
    sb = json.loads((part / "summary.json").read_text())
    assert sa["ranks"] == sb["ranks"] and sa["metrics"] == sb["metrics"]
    # the resumed run keeps the log cadence (4, 8, 12, 16, ...): the same records, line by line
    assert (part / "metrics.jsonl").read_text() == (full / "metrics.jsonl").read_text()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(fake_assets, tmp_path):
    bad = cfg("tiny-roberta", "optimizer.learning_rate=1e30", "optimizer.warmup_steps=0")
    with pytest.raises(runner.TrainingError) as err:
        runner.train(bad, tmp_path / "nan")
    msg = str(err.value)
    assert "at step" in msg and "checkpoint" in msg


def test_unwritable_output_and_existing_run(roberta_run, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(runner.TrainingError, match="cannot write"):
        runner.train(cfg(), blocker / "run")
    run = roberta_run[0]  # a finished run with checkpoints; refused before anything is written
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    with pytest.raises(runner.TrainingError, match="--resume"):
        runner.train(cfg(), run)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def test_corrupt_latest_checkpoint_falls_back(fake_assets, tmp_path):
    run = tmp_path / "c"
    runner.train(cfg(), run, interrupt_at=20)
    mgr = CheckpointManager(run / "checkpoints")
    steps = mgr.all_steps()
    assert len(steps) >= 2
    for f in (run / "checkpoints" / str(steps[-1])).rglob("*"):
        if f.is_file() and f.stat().st_size > 100:
            f.write_bytes(b"\0" * 10)
    s = runner.train(cfg(), run, resume=True)
    assert s["status"] == "finished"


def test_unknown_target_pattern_lists_modules(fake_assets, tmp_path):
    with pytest.raises(ConfigError) as err:
        runner.train(cfg("tiny-roberta", "aroma.target_modules=[qkv]"), tmp_path / "t")
    assert "'qkv'" in str(err.value) and "attention/self/query" in str(err.value)


@pytest.mark.slow
def test_tiny_bart_generation_and_rouge(fake_assets, tmp_path):
    s = runner.train(cfg("tiny-bart", "task.max_eval_examples=16"), tmp_path / "bart")
    assert set(s["metrics"]) == {"rouge1", "rouge2", "rougeL"}
    losses = [
        json.loads(x)["loss"]
        for x in (tmp_path / "bart" / "metrics.jsonl").read_text().splitlines()
        if '"train"' in x
    ]
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_bf16_model_with_rank_8_pairs(fake_assets, tmp_path):
    """bf16 weights computing in bf16 (factor path) with r = 8. XLA:CPU has no bf16 x bf16 ->
    fp32 dot, which the adapter's fp32-accumulating products asked for: this run crashed."""
    extra = ("model.dtype=bfloat16", "model.param_dtype=bfloat16", "aroma.r=8", "aroma.alpha=16")
    s = runner.train(cfg("tiny-roberta", *extra), tmp_path / "bf16")
    assert s["compiles"] == 1 and s["outer_steps"] >= 1
    assert set(s["ranks"].values()) == {8 * s["outer_steps"]}
    assert np.isfinite(list(s["metrics"].values())).all()


def test_tiny_llama_multiple_choice(llama_run):
    s = llama_run[1]
    assert "mc_accuracy" in s["metrics"] and s["compiles"] == 1


def test_cli_help_and_bad_key(fake_assets, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "aroma_jax.cli", "train", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "--resume" in out.stdout and "--set" in out.stdout
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "aroma_jax.cli",
            "train",
            "--config",
            str(CONFIGS / "tiny-roberta.yaml"),
            "--set",
            "train.batchsize=4",
            "--output",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "batchsize" in out.stderr and "batch_size" in out.stderr


@pytest.mark.slow
def test_mesh_run_matches_single_device(llama_run, tmp_path):
    import jax

    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    one, single = llama_run
    meshed = runner.train(cfg("tiny-llama", "mesh=fsdp=4,tensor=2"), tmp_path / "mesh")
    assert meshed["ranks"] == single["ranks"]
    assert meshed["metrics"] == single["metrics"]

    def last_loss(run):
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in recs if r["split"] == "train"][-1]

    assert last_loss(tmp_path / "mesh") == pytest.approx(last_loss(one), rel=1e-5)


@pytest.mark.slow
def test_paper_head_mode_adapts_the_classifier_dense_and_trains_no_head(fake_assets, tmp_path):
    s = runner.train(
        cfg("tiny-roberta", "train.head=paper", "aroma.max_steps=12", "aroma.keep_first_pair=true"),
        tmp_path / "paper",
    )
    assert s["head_params"] == 0
    assert "classifier/dense" in s["ranks"] and "classifier/out_proj" not in s["ranks"]
    assert s["rank_capacity"] is None and s["rank_capacity_derived"] == 12 // 8 + 1
    assert s["capacity_full"] == []
    assert set(s["inner_loops"]) == {
        "outer_by_eq5",
        "outer_by_cap",
        "module_loops_converged",
        "module_loops_capped",
    }

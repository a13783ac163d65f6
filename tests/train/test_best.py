"""``train.keep_best``: the kept step is the best validation step, test never chooses it, and
best/ survives --resume, a damaged file, eval and export (`aroma_jax.train.best`)."""

import json

import pytest

from aroma_jax import configs
from aroma_jax.core.config import ConfigError
from aroma_jax.train import artifacts, best, export, finalize, run_config, runner
from aroma_jax.train.hooks import Hook
from tests.train.test_runner import FAST as RUNNER_FAST

# tests/train/test_runner.py's short run (the same compiled step: one compile per session),
# evaluated every 10 steps (and at step 0).
FAST = [*RUNNER_FAST, "train.eval_every=10"]
# The validation accuracy each eval step reports: the peak of training is a middle eval (step
# 20); step 0 (the untrained model, higher still) is no candidate. The test split's own scores
# are real, so a selection that looked at test would not land on 20 by luck.
VALIDATION = {0: 0.95, 10: 0.5, 20: 0.9, 30: 0.7, 40: 0.6}


def cfg(*extra):
    return run_config.load(configs.root() / "tiny-roberta.yaml", FAST + list(extra))


@pytest.fixture
def scripted(monkeypatch):
    """The run's evaluator, with validation accuracy taken from `VALIDATION` by the state's step;
    returns the list of (split, step) evaluations in the order they ran."""
    calls = []
    build = runner.build_pipeline

    def patched(c):
        pipe = build(c)
        real = pipe.evaluator

        def evaluator(p, trainer, state, split, batch_size):
            out = real(p, trainer, state, split, batch_size)
            step = int(state.ctrl.step)
            calls.append((split, step))
            if split == "validation":
                out["accuracy"] = VALIDATION[step]
            return out

        pipe.evaluator = evaluator
        return pipe

    monkeypatch.setattr(runner, "build_pipeline", patched)
    return calls


def snapshot_every_eval(where):
    """A user hook: each eval step's state, finalized and saved as final/ would be."""

    def save(loop):
        final = loop.trainer.finalize(loop.state)
        artifacts.save_final(where / f"step{loop.step}", loop.trainer, final, (), loop.step)

    return Hook(save, every=10, name="snapshot")


def test_best_is_the_peak_validation_step(fake_assets, scripted, tmp_path):
    run = tmp_path / "run"
    s = runner.train(
        cfg("train.keep_best=accuracy"), run, hooks=[snapshot_every_eval(tmp_path / "snap")]
    )
    record = s["best"]
    assert (record["metric"], record["mode"], record["step"], record["value"]) == (
        "accuracy",
        "max",
        20,
        0.9,
    )
    # the summary names the step and value of the best validation row of metrics.jsonl
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["accuracy"] for r in rows if r["split"] == "validation"}
    assert val == VALIDATION  # every eval, the last step's included
    trained = {k: v for k, v in val.items() if k > 0}
    assert max(trained, key=lambda k: (val[k], -k)) == record["step"] and val[20] == record["value"]
    # the kept adapters are the state of step 20, finalized: byte for byte
    kept = (run / "best" / "adapters.safetensors").read_bytes()
    assert kept == (tmp_path / "snap" / "step20" / "adapters.safetensors").read_bytes()
    assert kept != (run / "final" / "adapters.safetensors").read_bytes()
    manifest = artifacts.verify_final(run / "best")
    assert manifest["step"] == 20 and manifest["best"]["value"] == 0.9
    # test is evaluated only after the last validation eval: once for final/, once for best/;
    # the sixth validation eval is final/'s (summary's final_validation_metrics), no candidate
    splits = [split for split, _ in scripted]
    assert splits == ["validation"] * 6 + ["test", "test"]
    assert s["final_validation_metrics"]["accuracy"] == VALIDATION[40]
    assert scripted[-1] == ("test", 20)
    # eval --which best scores best/ (rebuilt from its files) as the summary reports
    resolved = run_config.load_run(run)
    assert runner.evaluate_only(resolved, run, "test", which="best") == record["metrics"]
    # export --which best writes best/'s adapter, not final/'s
    peft = {w: export.export_peft(run, tmp_path / f"peft-{w}", which=w) for w in ("best", "final")}
    weights = {w: (p / "adapter_model.safetensors").read_bytes() for w, p in peft.items()}
    assert weights["best"] != weights["final"]
    # a damaged best/ is refused and rebuilt byte for byte from checkpoints-best/
    (run / "best" / "adapters.safetensors").write_bytes(kept[:-8])
    with pytest.raises(artifacts.FinalError, match="finalize .* --which best"):
        artifacts.verify_final(run / "best")
    finalize.finalize_run(run, which="best")
    assert (run / "best" / "adapters.safetensors").read_bytes() == kept
    assert artifacts.verify_final(run / "best")["best"] == manifest["best"]


@pytest.mark.slow
@pytest.mark.parametrize("stop", [25, 15])  # after the peak (step 20), before it
def test_resume_keeps_the_best_so_far(fake_assets, scripted, tmp_path, stop):
    full = tmp_path / "full"
    c = cfg("train.keep_best=accuracy")
    runner.train(c, full)
    part = tmp_path / "part"
    assert runner.train(c, part, interrupt_at=stop)["status"] == "interrupted"
    r = runner.train(c, part, resume=True)
    assert {k: r["best"][k] for k in ("step", "value")} == {"step": 20, "value": 0.9}
    kept = (full / "best" / "adapters.safetensors").read_bytes()
    assert (part / "best" / "adapters.safetensors").read_bytes() == kept
    assert r["best"] == json.loads((full / "summary.json").read_text())["best"]


def test_keep_best_errors(fake_assets, tmp_path):
    with pytest.raises(ConfigError, match=r"train.keep_best='rougeL'.*reports accuracy, f1"):
        runner.train(cfg("train.keep_best=rougeL"), tmp_path / "bad")
    assert not (tmp_path / "bad" / "config.yaml").exists()  # refused before anything is written
    with pytest.raises(ConfigError, match="keep_best"):
        cfg("train.keep_best=3")
    # a finished run trained without keep_best: --which best says so before loading anything
    plain = tmp_path / "plain"
    (plain / "final").mkdir(parents=True)
    (plain / "config.yaml").write_text("{}")
    (plain / "summary.json").write_text(json.dumps({"status": "finished"}))
    with pytest.raises(FileNotFoundError, match="kept no best checkpoint"):
        best.check_which(plain, "best")
    with pytest.raises(FileNotFoundError, match="kept no best checkpoint"):
        finalize.finalize_run(plain, which="best")
    with pytest.raises(ValueError, match="accepted final, best"):
        best.check_which(plain, "last")


def test_glue_presets_keep_the_best_of_their_table_metric():
    """The GLUE presets select on the metric their table reports (mcc, pearson, accuracy)."""
    from aroma_jax.data.glue import GLUE_TASKS
    from experiments import paper

    presets = sorted((configs.root() / "paper" / "glue").glob("*.yaml"))
    assert len(presets) == 29
    for path in presets:
        c = run_config.load(path)
        task = c.task.name.split("/")[1]
        assert c.train.keep_best == GLUE_TASKS[task].metric, path.name
    for path in (configs.root() / "paper").glob("[cx]*/*.yaml"):  # commonsense, xsum: final
        assert run_config.load(path).train.keep_best is None, path.name
    # the tables read the best step's test metrics where a run kept one, else the final ones
    summary = {"metrics": {"accuracy": 0.8}, "best": {"metrics": {"accuracy": 0.9}}}
    assert paper.reported(summary) == {"accuracy": 0.9}
    assert paper.reported({"metrics": {"accuracy": 0.8}, "best": None}) == {"accuracy": 0.8}

"""`aroma-jax analyze` on a tiny trained run (and a LoRA run built in the same layout)."""

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from aroma_jax import cli, configs
from aroma_jax.train import run_config, runner

CONFIGS = configs.root()
FAST = [
    "train.progress=false",
    "task.max_train_examples=128",
    "task.max_eval_examples=16",
    "train.batch_size=8",
    "train.eval_every=100",
    "train.log_every=4",
    "train.save_every=100",
    "train.eval_at_start=false",
    "aroma.max_steps=8",
    "aroma.inner_max_steps=4",
    "aroma.inner_check_every=2",
    "aroma.outer_tol=1e-4",
    "optimizer.warmup_steps=2",
    "aroma.rewarmup_steps=2",
]


@pytest.fixture(scope="module")
def runs(fake_assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze")
    aroma = root / "seed0" / "aroma"
    runner.train(run_config.load(CONFIGS / "tiny-roberta.yaml", FAST), aroma)
    # A LoRA r=2 run in the same layout: one merged block of rank 2 per module.
    meta = json.loads((aroma / "final/meta.json").read_text())
    rng = np.random.default_rng(0)
    tensors = {}
    for p in meta["paths"]:
        fan_in, fan_out = meta["kernel_shapes"][p]
        tensors[f"frozen/{p}/a"] = rng.normal(size=(fan_in, 2)).astype(np.float32)
        tensors[f"frozen/{p}/b"] = rng.normal(size=(2, fan_out)).astype(np.float32)
        tensors[f"merges/{p}"] = np.ones(1, np.int32)
    lora = root / "seed0" / "lora"
    (lora / "final").mkdir(parents=True)
    save_file(tensors, str(lora / "final/adapters.safetensors"))
    lmeta = {
        **meta,
        "method": "lora",
        "r": 2,
        "scale": 8.0,
        "ranks": dict.fromkeys(meta["paths"], 2),
    }
    (lora / "final/meta.json").write_text(json.dumps(lmeta))
    steps = [{"step": s, "loss": 0.7, "lr": 1e-3, "total_rank": 0} for s in range(1, 9)]
    hist = {"modules": meta["paths"], "inner_checks": [], "outer_steps": [], "steps": steps}
    (lora / "history.json").write_text(json.dumps(hist))
    return aroma, lora


def test_analyze_two_runs(runs, tmp_path, capsys):
    aroma, lora = runs
    out = tmp_path / "out"
    assert cli.main(["analyze", str(aroma), str(lora), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    names = ["analysis.json", "cosine.png", "curves.png", "rank_map.png", "report.md"]
    assert sorted(Path(p).name for p in printed) == sorted([*names, "subspace.png"])
    for f in ("rank_map.png", "curves.png", "cosine.png", "subspace.png"):
        assert (out / f).stat().st_size > 5000
    data = json.loads((out / "analysis.json").read_text())
    a, lo = data["runs"]
    assert [a["name"], lo["name"]] == ["aroma", "lora"]
    summary = json.loads((aroma / "summary.json").read_text())
    tensors = load_file(str(aroma / "final/adapters.safetensors"))
    assert len(a["modules"]) == 12
    for p, m in a["modules"].items():
        assert m["rank"] == summary["ranks"][p]
        dense = 4.0 * tensors[f"frozen/{p}/a"].astype(np.float64) @ tensors[f"frozen/{p}/b"]
        want = np.linalg.svd(dense, compute_uv=False)[: m["rank"]]
        np.testing.assert_allclose(m["singular_values"], want, rtol=1e-6, atol=1e-7)
        p_k = want / want.sum()
        assert m["effective_rank"] == pytest.approx(np.exp(-np.sum(p_k * np.log(p_k))), rel=1e-6)
    assert a["totals"]["total_rank"] == summary["total_rank"]
    ts = a["timeseries"]
    assert ts["steps"] == list(range(1, 9)) and len(ts["trained_params"]) == 8
    n_outer = summary["outer_steps"]
    assert sum(ts["triggers"].values()) == n_outer and len(ts["inner_loop_ends"]) == n_outer
    assert ts["total_rank"][-1] == summary["total_rank"]
    assert lo["timeseries"]["total_rank"] == [24] * 8  # LoRA: r * 12 modules throughout
    assert lo["timeseries"]["average_trained_params"] == 2 * sum(
        sum(s) for s in json.loads((lora / "final/meta.json").read_text())["kernel_shapes"].values()
    )
    mod = data["module"]
    assert data["cosine"]["module"] == mod and len(data["cosine"]["pairs"]) == 1
    assert np.asarray(data["cosine"]["pairs"][0]["matrix"]).shape == (a["modules"][mod]["rank"], 2)
    (cmp_,) = data["subspace"]
    assert cmp_["runs"] == ["aroma", "lora"] and len(cmp_["modules"]) == 12
    assert 0.0 <= cmp_["mean_similarity"] <= 1.0
    report = (out / "report.md").read_text()
    for s in ("`aroma`", "`lora`", "![rank_map](rank_map.png)", mod, "Modules of `lora`"):
        assert s in report


def test_analyze_one_run_with_module_and_label(runs, tmp_path):
    aroma, _ = runs
    out = tmp_path / "one"
    mod = "roberta/encoder/layer/1/attention/self/value"
    argv = ["analyze", str(aroma), "--out", str(out), "--module", mod, "--label", "mine"]
    assert cli.main(argv) == 0
    assert not (out / "subspace.png").exists() and (out / "cosine.png").exists()
    data = json.loads((out / "analysis.json").read_text())
    assert data["module"] == mod and data["runs"][0]["name"] == "mine"
    self_cos = np.asarray(data["cosine"]["self"]["mine"])
    np.testing.assert_allclose(np.diag(self_cos), 1.0, rtol=1e-5)


def test_analyze_bad_input(runs, tmp_path, capsys):
    aroma, lora = runs
    assert cli.main(["analyze", str(aroma), "--out", str(tmp_path), "--module", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--module 'nope' is not adapted in every run" in err and "layer/0" in err
    assert cli.main(["analyze", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "not a finished run directory" in capsys.readouterr().err
    argv = ["analyze", str(aroma), str(lora), "--out", str(tmp_path), "--label", "x"]
    assert cli.main(argv) == 2
    assert "1 labels for 2 runs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["analyze", "--help"])
    help_text = capsys.readouterr().out
    for opt in ("RUN", "--out", "--module", "--label", "report.md", "analysis.json"):
        assert opt in help_text

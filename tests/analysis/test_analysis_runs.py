"""Reading factors from run directories and live states; per-run numbers and cross-run studies."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from safetensors.numpy import save_file

from aroma_jax.analysis import spectra, summary
from aroma_jax.analysis.runs import from_state, locate, open_run, unique_names
from aroma_jax.core.config import AromaConfig
from aroma_jax.core.history import History
from aroma_jax.core.train_step import AromaTrainer

PATHS = {  # path -> (in, out)
    "bert/encoder/layer/0/attention/self/value": (8, 8),
    "bert/encoder/layer/0/intermediate/dense": (8, 16),
    "bert/encoder/layer/1/attention/self/value": (8, 8),
}


def write_run(directory, method, r, comps, scale=2.0, history=None):
    """A run directory in the exact layout of `train.artifacts.save_final` (factors only)."""
    final = directory / "final"
    final.mkdir(parents=True)
    tensors, ranks = {}, {}
    for p, (a, b) in comps.items():
        tensors[f"frozen/{p}/a"] = np.ascontiguousarray(a, np.float32)
        tensors[f"frozen/{p}/b"] = np.ascontiguousarray(b, np.float32)
        tensors[f"merges/{p}"] = np.asarray([a.shape[1] // r], np.int32)
        ranks[p] = a.shape[1]
    save_file(tensors, str(final / "adapters.safetensors"))
    meta = {"scale": scale, "r": r, "alpha": scale * r, "method": method, "paths": sorted(comps)}
    meta["ranks"] = ranks
    (final / "meta.json").write_text(json.dumps(meta))
    if history is not None:
        (directory / "history.json").write_text(json.dumps(history))
    return directory


def random_comps(ks, seed):
    rng = np.random.default_rng(seed)
    return {
        p: (rng.normal(size=(i, k)), rng.normal(size=(k, o)))
        for (p, (i, o)), k in zip(PATHS.items(), ks, strict=True)
    }


def test_locate_generic_paths():
    assert locate("bert/encoder/layer/3/attention/self/value") == (
        "encoder",
        3,
        "attention/self/value",
        "W_v",
    )
    assert locate("roberta/encoder/layer/0/output/dense").label == "W_f2"
    assert locate("roberta/encoder/layer/0/intermediate/dense").label == "W_f1"
    assert locate("model/layers/5/self_attn/q_proj")[1:] == (5, "self_attn/q_proj", "W_q")
    assert locate("model/decoder/layers/2/encoder_attn/q_proj") == (
        "decoder",
        2,
        "encoder_attn/q_proj",
        "encoder_attn/q_proj",
    )
    assert locate("proj") == ("", None, "proj", "proj")
    assert unique_names(["runs/s0/aroma", "runs/s1/aroma", "runs/s0/lora"]) == [
        "s0/aroma",
        "s1/aroma",
        "s0/lora",
    ]


def test_open_run_streams_modules_and_matches_dense(tmp_path):
    comps = random_comps([3, 0, 2], seed=0)
    run = open_run(write_run(tmp_path / "a", "aroma", 1, comps))
    assert run.paths == tuple(sorted(PATHS)) and run.method == "aroma" and run.history is None
    assert run.shapes["bert/encoder/layer/0/intermediate/dense"] == (8, 16, 0)
    rep = summary.analyze_run(run)
    for p, (a, b) in comps.items():
        m = rep["modules"][p]
        dense = 2.0 * a.astype(np.float32).astype(np.float64) @ b.astype(np.float32)
        full = np.linalg.svd(dense, compute_uv=False)[: a.shape[1]]
        np.testing.assert_allclose(m["singular_values"], full, rtol=1e-6, atol=1e-6)
        assert m["rank"] == a.shape[1]
        assert m["effective_rank"] == pytest.approx(spectra.effective_rank(full), rel=1e-6)
    t = rep["totals"]
    assert t["total_rank"] == 5 and t["zero_rank_modules"] == 1
    eranks = [rep["modules"][p]["effective_rank"] for p in sorted(PATHS)]
    assert t["effective_rank_ratio"] == pytest.approx(sum(eranks) / 5)
    assert t["mean_effective_rank_ratio"] == pytest.approx((eranks[0] / 3 + eranks[2] / 2) / 2)
    assert rep["timeseries"] is None
    with pytest.raises(KeyError, match="no adapted module 'nope'"):
        run.factors("nope")


def test_open_run_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a finished run directory"):
        open_run(tmp_path)
    d = write_run(tmp_path / "b", "aroma", 1, random_comps([1, 1, 1], 0))
    meta = json.loads((d / "final/meta.json").read_text())
    meta["paths"].append("x/1/query")
    (d / "final/meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="lacks the factors of module 'x/1/query'"):
        open_run(d)


def test_compare_and_cosines(tmp_path):
    c1 = random_comps([3, 2, 2], seed=1)
    c2 = {p: (2.0 * a[:, ::-1], b[::-1]) for p, (a, b) in c1.items()}  # same update, reordered
    c3 = random_comps([2, 2, 2], seed=2)
    r1 = open_run(write_run(tmp_path / "r1", "aroma", 1, c1), "one")
    r2 = open_run(write_run(tmp_path / "r2", "aroma", 1, c2), "two")
    r3 = open_run(write_run(tmp_path / "r3", "lora", 2, c3), "three")
    same = summary.compare_runs(r1, r2, grid_module=r1.paths[0])
    for m in same["modules"].values():
        assert m["similarity"] == pytest.approx(1.0) and m["similarity_output"] == pytest.approx(1)
        assert max(m["angles_deg"]) < 1e-3
    assert np.asarray(same["modules"][r1.paths[0]]["grid"]).shape == (3, 3)
    diff = summary.compare_runs(r1, r3)
    p = r1.paths[0]
    u1 = np.linalg.svd(2.0 * c1[p][0] @ c1[p][1])[0][:, :2]
    u3 = np.linalg.svd(2.0 * c3[p][0] @ c3[p][1])[0][:, :2]
    want = np.linalg.norm(u1.T @ u3, "fro") ** 2 / 2
    assert diff["modules"][p]["similarity"] == pytest.approx(want, abs=1e-5)
    assert diff["modules"][p]["k"] == 2 and "grid" not in diff["modules"][p]
    # Appendix E: run two's components are run one's in reverse order
    study = summary.cosine_study([r1, r2], p)
    m = np.asarray(study["pairs"][0]["matrix"])
    np.testing.assert_allclose(np.fliplr(m).diagonal(), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.diag(np.asarray(study["self"]["one"])), 1.0, rtol=1e-5)
    assert study["pairs"][0]["diagonal"] == pytest.approx(list(np.diag(m)))
    # the default module: most components in the run where it has fewest
    assert summary.pick_module([r1, r3]) == "bert/encoder/layer/0/attention/self/value"
    assert summary.pick_module([r1]) == "bert/encoder/layer/0/attention/self/value"


def test_from_live_state_matches_dense_update():
    model = nn.Sequential([nn.Dense(6), nn.relu, nn.Dense(3)])
    params = model.init(jax.random.key(0), jnp.ones((1, 5)))["params"]

    def loss_fn(p, batch, rng):
        return jnp.mean((model.apply({"params": p}, batch["x"]) - batch["y"]) ** 2)

    cfg = AromaConfig(
        target_modules=("layers_0", "layers_2"),
        r=1,
        alpha=2.0,
        max_steps=40,
        inner_max_steps=5,
        inner_check_every=5,
        warmup_steps=0,
        rewarmup_steps=0,
        outer_tol=0.0,
        learning_rate=0.05,
        fold="never",
    )
    trainer = AromaTrainer(loss_fn, params, cfg, donate=False)
    state = trainer.init(params)
    hist = History(trainer.paths)
    rng = np.random.default_rng(0)
    batch = {"x": jnp.asarray(rng.normal(size=(16, 5))), "y": jnp.asarray(rng.normal(size=(16, 3)))}
    infos = []
    for _ in range(12):  # outer steps at 5 and 10, the pairs trained 2 steps since
        state, info = trainer.step(state, batch)
        infos.append(info)
    hist.extend(infos)
    run = from_state(trainer, state, hist)
    assert run.ranks == {"layers_0": 3, "layers_2": 3}  # two merged + the live pair
    assert len(run.history["steps"]) == 12 and run.inner_tol == cfg.inner_tol
    for p in trainer.paths:
        f, pair = state.adapters.frozen[p], state.adapters.pairs[p]
        dense = cfg.scale * (np.asarray(f.a) @ np.asarray(f.b) + np.asarray(pair.a @ pair.b))
        m = run.factors(p)
        got = spectra.singular_values(m.a, m.b, m.scale)
        np.testing.assert_allclose(got, np.linalg.svd(dense, compute_uv=False)[:3], rtol=1e-5)
    merged_only = from_state(trainer, state, include_pair=False)
    assert merged_only.ranks == {"layers_0": 2, "layers_2": 2}
    assert merged_only.factors("layers_0").a.shape == (5, 2)
    rep = summary.analyze_run(run)
    assert rep["timeseries"]["steps"] == list(range(1, 13))
    assert [e["step"] for e in rep["timeseries"]["inner_loop_ends"]] == [5, 10]


@pytest.mark.filterwarnings("error")
def test_report_with_a_rank_zero_module(tmp_path):
    from aroma_jax.analysis import report

    r1 = write_run(tmp_path / "a", "aroma", 1, random_comps([3, 0, 2], 0))
    r2 = write_run(tmp_path / "b", "aroma", 1, random_comps([1, 0, 2], 1))
    zero = "bert/encoder/layer/0/intermediate/dense"
    res = report.analyze([r1, r2], tmp_path / "out", module=zero)
    assert res["files"] == [
        "analysis.json",
        "cosine.png",
        "rank_map.png",
        "report.md",
        "subspace.png",
    ]
    assert res["cosine"]["pairs"][0]["matrix"] == [] and res["module"] == zero
    sub = res["subspace"][0]["modules"]
    assert sub[zero]["similarity"] is None and sub[zero]["grid"] == []
    data = json.loads((tmp_path / "out/analysis.json").read_text())
    assert data["runs"][0]["modules"][zero]["effective_rank_ratio"] is None  # NaN -> null
    # default module: the most components where it has fewest (layer 1 value: 2 in both)
    assert report.build([open_run(r1), open_run(r2)])["module"].endswith(
        "layer/1/attention/self/value"
    )


def test_report_of_runs_that_share_no_module(tmp_path):
    from aroma_jax.analysis import report

    r1 = write_run(tmp_path / "a", "aroma", 1, random_comps([1, 2, 3], 0))
    other = {p.replace("bert/", "roberta/"): f for p, f in random_comps([2, 2, 2], 1).items()}
    r2 = write_run(tmp_path / "b", "lora", 2, other)
    res = report.analyze([r1, r2], tmp_path / "out")
    assert res["module"] is None and res["cosine"] is None
    assert res["files"] == ["analysis.json", "rank_map.png", "report.md"]
    assert res["subspace"][0]["modules"] == {}
    assert "share no adapted module" in (tmp_path / "out/report.md").read_text()
    with pytest.raises(ValueError, match="modules all runs share: none"):
        report.analyze([r1, r2], tmp_path / "out", module=open_run(r1).paths[0])

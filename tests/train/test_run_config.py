import pytest

from aroma_jax.core.config import ConfigError
from aroma_jax.train import run_config


def test_defaults_file_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: {name: tiny-roberta}\ntrain: {batch_size: 4}\naroma: {r: 2}\n")
    cfg = run_config.load(
        f,
        [
            "aroma.alpha=8",
            "aroma.target_modules=[query, value]",
            "train.progress=false",
            "mesh=data=2,fsdp=4",
        ],
    )
    assert cfg["train"]["batch_size"] == 4 and cfg["train"]["eval_every"] == 100
    assert cfg["aroma"] == {"r": 2, "alpha": 8, "target_modules": ["query", "value"]}
    assert cfg["train"]["progress"] is False and cfg["mesh"] == "data=2,fsdp=4"
    aroma = run_config.aroma_config(cfg, ("query", "key"), ("classifier",))
    assert aroma.target_modules == ("query", "value") and aroma.train_patterns == ("classifier",)
    assert aroma.scale == 4.0


def test_preset_targets_when_unset():
    cfg = run_config.resolve({}, ["train.train_head=false"])
    aroma = run_config.aroma_config(cfg, ("query", "value"), ("classifier",))
    assert aroma.target_modules == ("query", "value") and aroma.train_patterns == ()


def test_head_modes():
    cfg = run_config.resolve({}, [])
    assert run_config.head_mode(cfg) == "train"
    heads = ("classifier",)
    paper = run_config.resolve({}, ["train.head=paper"])
    aroma = run_config.aroma_config(paper, ("query",), heads, ("classifier/dense",))
    assert aroma.target_modules == ("query", "classifier/dense") and aroma.train_patterns == ()
    frozen = run_config.resolve({}, ["train.head=frozen"])
    aroma = run_config.aroma_config(frozen, ("query",), heads, ("classifier/dense",))
    assert aroma.target_modules == ("query",) and aroma.train_patterns == ()
    aroma = run_config.aroma_config(cfg, ("query",), heads, ("classifier/dense",))
    assert aroma.target_modules == ("query",) and aroma.train_patterns == heads
    with pytest.raises(ConfigError, match="train.head='adapted'.*'train', 'frozen', 'paper'"):
        run_config.resolve({}, ["train.head=adapted"])


@pytest.mark.parametrize(
    "raw,overrides,words",
    [
        ({"train": {"batchsize": 4}}, [], ["batchsize", "batch_size"]),
        ({"aroma": {"inner_tolerance": 0.1}}, [], ["inner_tolerance", "inner_tol"]),
        ({"optimizer": {}}, [], ["optimizer", "train"]),
        ({}, ["aroma.rr=2"], ["rr", "inner_max_steps"]),
        ({}, ["foo.bar=1"], ["foo", "sections"]),
        ({}, ["aroma.r"], ["section.key=value"]),
        ({}, ["train.batch_size=0"], ["train.batch_size", ">= 1"]),
        ({}, ["model.dtype=float16"], ["float16", "bfloat16"]),
    ],
)
def test_bad_keys_and_values_name_what_is_accepted(raw, overrides, words):
    with pytest.raises(ConfigError) as err:
        run_config.resolve(raw, overrides)
    for w in words:
        assert w in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        run_config.load(tmp_path / "nope.yaml")


def test_a_run_written_before_scan_layers_existed_keeps_its_unrolled_layers(tmp_path):
    """`model.scan_layers` (default auto: scanned native models) was added after runs were
    written; a run directory without the key resumes, evaluates and exports unrolled."""
    import yaml

    resolved = run_config.load(None, ["model.name=tiny-llama"])
    old = {k: dict(v) if isinstance(v, dict) else v for k, v in resolved.items()}
    del old["model"]["scan_layers"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    assert run_config.load_run(tmp_path)["model"]["scan_layers"] is False
    assert run_config.adopt_legacy(resolved, old)["model"]["scan_layers"] is False
    chosen = run_config.load(None, ["model.scan_layers=true"])
    assert run_config.adopt_legacy(chosen, old)["model"]["scan_layers"] is True  # explicit
    assert run_config.adopt_legacy(resolved, resolved)["model"]["scan_layers"] == "auto"
    with pytest.raises(ConfigError, match="model.scan_layers"):
        run_config.load(None, ["model.scan_layers=sometimes"])


def test_resume_accepts_keys_added_after_the_run_at_their_old_behaviour(tmp_path):
    """A run's config.yaml predates keys added since (here model.remat, aroma.keep_first_pair):
    at their defaults they keep the old behaviour, so resuming is allowed; a changed value
    is still refused."""
    import yaml

    from aroma_jax.core.config import AromaConfig
    from aroma_jax.train.runner import TrainingError, check_resume_config

    cfg = run_config.load(None, ["model.name=tiny-llama"])
    resolved = run_config.to_plain(cfg, AromaConfig(target_modules=("q_proj",)))
    old = yaml.safe_load(yaml.safe_dump(resolved))
    del old["model"]["remat"], old["aroma"]["keep_first_pair"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    check_resume_config(tmp_path / "config.yaml", resolved)
    changed = run_config.to_plain(
        run_config.load(None, ["model.name=tiny-llama", "model.remat=full"]),
        AromaConfig(target_modules=("q_proj",)),
    )
    with pytest.raises(TrainingError, match="model.remat"):
        check_resume_config(tmp_path / "config.yaml", changed)

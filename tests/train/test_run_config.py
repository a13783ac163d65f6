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
    assert cfg.train.batch_size == 4 and cfg.train.eval_every == 100
    assert (cfg.aroma.r, cfg.aroma.alpha, cfg.aroma.target_modules) == (2, 8, ("query", "value"))
    assert cfg.train.progress is False and cfg.mesh == "data=2,fsdp=4"
    aroma = run_config.method_config(cfg, ("query", "key"), ("classifier",))
    assert aroma.target_modules == ("query", "value") and aroma.train_patterns == ("classifier",)
    assert aroma.scale == 4.0


def test_preset_targets_when_unset():
    cfg = run_config.resolve({}, ["train.head=frozen"])
    aroma = run_config.method_config(cfg, ("query", "value"), ("classifier",))
    assert aroma.target_modules == ("query", "value") and aroma.train_patterns == ()


def test_head_modes():
    cfg = run_config.resolve({}, [])
    assert cfg.train.head == "train"
    heads = ("classifier",)
    paper = run_config.resolve({}, ["train.head=paper"])
    aroma = run_config.method_config(paper, ("query",), heads, ("classifier/dense",))
    assert aroma.target_modules == ("query", "classifier/dense") and aroma.train_patterns == ()
    frozen = run_config.resolve({}, ["train.head=frozen"])
    aroma = run_config.method_config(frozen, ("query",), heads, ("classifier/dense",))
    assert aroma.target_modules == ("query",) and aroma.train_patterns == ()
    aroma = run_config.method_config(cfg, ("query",), heads, ("classifier/dense",))
    assert aroma.target_modules == ("query",) and aroma.train_patterns == heads
    with pytest.raises(ConfigError, match="train.head='adapted'.*'train', 'frozen', 'paper'"):
        run_config.resolve({}, ["train.head=adapted"])


@pytest.mark.parametrize(
    "raw,overrides,words",
    [
        ({"train": {"batchsize": 4}}, [], ["batchsize", "batch_size"]),
        ({"aroma": {"inner_tolerance": 0.1}}, [], ["inner_tolerance", "inner_tol"]),
        ({"optimiser": {}}, [], ["optimiser", "optimizer"]),
        ({"optimizer": {"lr": 1e-3}}, [], ["lr", "learning_rate"]),
        ({}, ["optimizer.learning_rate=-1"], ["optimizer.learning_rate", "> 0"]),
        ({}, ["aroma.inner_tol=-1"], ["aroma.inner_tol", ">= 0"]),
        ({"aroma": {"method": "lora", "fraction": 1}}, [], ["fraction", "lora", "alpha"]),
        ({}, ["aroma.method=nope"], ["aroma.method", "lora"]),
        ({}, ["train.grad_accum=0"], ["train.grad_accum", "positive integer dividing"]),
        ({}, ["train.trackers=3"], ["train.trackers", "list"]),
        ({}, ["aroma.rr=2"], ["rr", "inner_max_steps"]),
        ({}, ["foo.bar=1"], ["foo", "sections"]),
        ({}, ["aroma.r"], ["section.key=value"]),
        ({}, ["train.batch_size=0"], ["train.batch_size", ">= 1"]),
        ({}, ["model.dtype=float16"], ["float16", "bfloat16"]),
        ({}, ["task.streaming=1"], ["task.streaming=1", "true, false or auto"]),
        ({}, ["task.streaming=lazy"], ["task.streaming='lazy'", "true, false or auto"]),
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
    old = run_config.to_plain(resolved)
    del old["model"]["scan_layers"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    assert run_config.load_run(tmp_path).model.scan_layers is False
    assert run_config.adopt_legacy(resolved, old).model.scan_layers is False
    chosen = run_config.load(None, ["model.scan_layers=true"])
    assert run_config.adopt_legacy(chosen, old).model.scan_layers is True  # explicit
    plain = run_config.to_plain(resolved)
    assert run_config.adopt_legacy(resolved, plain).model.scan_layers == "auto"
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


# ------------------------------------------------------------------ typed sections, migration
def test_each_method_section_is_its_own_config_class():
    """LoRA's section has no eq. 5/6 thresholds, AdaLoRA's has its budget; the optimizer is a
    section of its own and reaches the `AromaConfig` the trainer gets."""
    lora = run_config.resolve({"aroma": {"method": "lora", "r": 8}})
    assert type(lora.aroma).__name__ == "LoRAConfig" and not hasattr(lora.aroma, "outer_tol")
    ada = run_config.resolve({"aroma": {"method": "adalora", "init_r": 6, "target_r": 2}})
    assert (ada.aroma.init_r, ada.aroma.target_r) == (6, 2) and not hasattr(ada.aroma, "inner_tol")
    cfg = run_config.resolve({"optimizer": {"learning_rate": 1e-3, "schedule": "cosine"}})
    aroma = run_config.method_config(cfg, ("query",), ())
    assert (aroma.learning_rate, aroma.schedule) == (1e-3, "cosine")
    assert aroma.inner_tol == cfg.aroma.inner_tol == 0.1
    plain = run_config.to_plain(cfg, aroma)
    assert plain["optimizer"]["learning_rate"] == 1e-3 and "learning_rate" not in plain["aroma"]
    assert plain["aroma"]["target_modules"] == ["query"] and plain["aroma"]["seed"] == 0
    assert run_config.resolve(plain).aroma == cfg.aroma.__class__(
        **{
            **{k: v for k, v in vars(cfg.aroma).items()},
            "target_modules": ("query",),
            "train_patterns": (),
            "seed": 0,
        }
    )


def test_old_keys_are_migrated_with_a_warning_naming_the_new_key(tmp_path):
    """A config written before the optimizer section (its keys under aroma:, train_head) loads
    to the same resolved config as its new form, warning with each new name."""
    old = tmp_path / "old.yaml"
    old.write_text(
        "model: {name: tiny-roberta}\n"
        "train: {batch_size: 8, train_head: false}\n"
        "aroma: {r: 2, learning_rate: 3.0e-3, warmup_steps: 10, schedule: cosine}\n"
    )
    new = tmp_path / "new.yaml"
    new.write_text(
        "model: {name: tiny-roberta}\n"
        "train: {batch_size: 8, head: frozen}\n"
        "aroma: {r: 2}\n"
        "optimizer: {learning_rate: 3.0e-3, warmup_steps: 10, schedule: cosine}\n"
    )
    with pytest.warns(run_config.ConfigMigrationWarning) as caught:
        got = run_config.load(old)
    text = " ".join(str(w.message) for w in caught)
    for moved in (
        "aroma.learning_rate -> optimizer.learning_rate",
        "train.train_head -> train.head",
    ):
        assert moved in text
    assert got == run_config.load(new)
    with pytest.warns(run_config.ConfigMigrationWarning, match="optimizer.b2"):
        assert run_config.load(new, ["aroma.b2=0.99"]).optimizer.b2 == 0.99
    both = tmp_path / "both.yaml"
    both.write_text("aroma: {learning_rate: 1.0}\noptimizer: {learning_rate: 2.0}\n")
    with pytest.raises(ConfigError, match="twice.*keep optimizer.learning_rate"):
        run_config.load(both)


def test_another_methods_key_is_ignored_with_a_warning():
    with pytest.warns(run_config.ConfigMigrationWarning, match=r"'lora' has no setting.*outer_tol"):
        cfg = run_config.resolve({"aroma": {"method": "lora", "outer_tol": 0.01, "r": 4}})
    assert cfg.aroma.r == 4 and "outer_tol" not in run_config.to_plain(cfg)["aroma"]


def test_an_old_run_directory_resumes_evaluates_and_exports_from_its_config(tmp_path):
    """A run's config.yaml as the old runner wrote it (every AromaConfig field under aroma:,
    train_head) loads, and `check_resume_config` accepts resuming it with the same settings."""
    import dataclasses

    import yaml

    from aroma_jax.core.config import AromaConfig
    from aroma_jax.train.runner import TrainingError, check_resume_config

    cfg = run_config.load(None, ["model.name=tiny-llama", "aroma.method=lora", "aroma.r=4"])
    aroma = run_config.method_config(cfg, ("q_proj",), ())
    new = run_config.to_plain(cfg, aroma)
    old = {k: v for k, v in new.items() if k != "optimizer"}
    old["aroma"] = {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in dataclasses.asdict(aroma).items()
        if k != "options"
    }
    old["train"] = {**old["train"], "train_head": True}
    for key in ("grad_accum", "keep_best", "trackers"):
        del old["train"][key]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    with pytest.warns(run_config.ConfigMigrationWarning):
        loaded = run_config.load_run(tmp_path)
    assert loaded.optimizer == cfg.optimizer and loaded.aroma.r == 4
    assert run_config.method_config(loaded, ("x",), ()) == aroma.replace(target_modules=("q_proj",))
    check_resume_config(tmp_path / "config.yaml", new)
    changed = run_config.to_plain(
        run_config.load(
            None,
            [
                "model.name=tiny-llama",
                "aroma.method=lora",
                "aroma.r=4",
                "optimizer.learning_rate=1e-2",
            ],
        ),
        aroma,
    )
    with pytest.raises(TrainingError, match="optimizer.learning_rate"):
        check_resume_config(tmp_path / "config.yaml", changed)
    assert isinstance(aroma, AromaConfig)


def test_a_plug_in_method_brings_its_own_config_class():
    """The example method's section has its own field (`fraction`), validated at load and read
    typed by the method in the step (`Method.settings`)."""
    path = "aroma_jax.examples.custom_method:GrowWhileRatioHolds"
    cfg = run_config.resolve({"aroma": {"method": path, "fraction": 0.25}})
    assert cfg.aroma.fraction == 0.25 and cfg.aroma.outer_tol == 5e-3
    aroma = run_config.method_config(cfg, ("query",), ())
    assert dict(aroma.options) == {"fraction": 0.25}
    assert aroma.plugin.settings(aroma).fraction == 0.25
    assert run_config.to_plain(cfg)["aroma"]["fraction"] == 0.25
    with pytest.raises(ConfigError, match="aroma.fraction"):
        run_config.resolve({"aroma": {"method": path, "fraction": 2.0}})

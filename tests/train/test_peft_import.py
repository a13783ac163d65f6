"""PEFT LoRA adapters in (`aroma_jax.train.peft_import`): our own export loaded back, an adapter
made by real ``peft`` in PyTorch, AROMA growing on top, LoRA continuing, and the refusals."""

import json

import numpy as np
import pytest

from aroma_jax import AromaConfig, AromaTrainer
from aroma_jax.data import objectives
from aroma_jax.models.native import NativeCausalLM, NativeConfig
from aroma_jax.train import artifacts, export
from aroma_jax.train.peft_import import PeftImportError, load_adapter, read_adapter

TINY = dict(
    model_type="llama",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=False,
)


def batches(n):
    for i in range(n):
        rng = np.random.default_rng(i % 2)
        x = rng.integers(3, 64, (4, 12)).astype(np.int32)
        x[:, 6:] = x[:, :6]
        loss_mask = np.zeros_like(x)
        loss_mask[:, 6:] = 1
        yield {"input_ids": x, "attention_mask": np.ones_like(x), "loss_mask": loss_mask}


def aroma_cfg(**kw):
    base = dict(
        target_modules=("q_proj", "v_proj"),
        r=1,
        alpha=2.0,
        learning_rate=3e-2,
        max_steps=12,
        inner_max_steps=4,
        inner_check_every=2,
        outer_tol=1e-4,
        warmup_steps=2,
        rewarmup_steps=2,
        rank_capacity=16,
    )
    return AromaConfig(**{**base, **kw})


def train(model, cfg, state=None, trainer=None):
    loss_fn, _ = objectives.causal_lm(model)
    trainer = trainer or AromaTrainer(loss_fn, model.params, cfg, donate=False)
    state = trainer.init(model.params) if state is None else state
    losses = []
    for batch in batches(cfg.max_steps):
        state, info = trainer.step(state, batch)
        losses.append(float(info.loss))
    return trainer, state, losses


def logits(model, trainer, state, x):
    with trainer.applied(state) as p:
        return np.asarray(model(x["input_ids"], x["attention_mask"], params=p).logits)


def write_peft(trainer, state, out):
    artifacts.save_final(out / "final", trainer, state)
    tensors, meta = artifacts.load_final(out / "final")
    config, st = export.peft_files(
        tensors, meta, lambda p: p.replace("/", "."), "tiny", "CAUSAL_LM", []
    )
    from safetensors.numpy import save_file

    (out / "peft").mkdir()
    save_file(st, str(out / "peft" / "adapter_model.safetensors"))
    (out / "peft" / "adapter_config.json").write_text(json.dumps(config))
    return out / "peft"


def test_own_export_round_trip_then_aroma_grows_on_top(tmp_path):
    model = NativeCausalLM(NativeConfig.from_dict(TINY), seed=0)
    cfg = aroma_cfg()
    trainer, state, _ = train(model, cfg)
    final = trainer.finalize(state)
    x = next(batches(1))
    want = logits(model, trainer, final, x)
    peft_dir = write_peft(trainer, final, tmp_path)

    fresh = AromaTrainer(trainer.loss_fn, model.params, cfg, donate=False)
    loaded = load_adapter(fresh, fresh.init(model.params), peft_dir)
    got = logits(model, fresh, loaded, x)
    err = np.abs(got - want).max()
    print(f"own PEFT export loaded back: max |logits diff| = {err:.2e}")
    assert err < 1e-5
    before = fresh.ranks(loaded)
    assert before == trainer.ranks(final) and max(before.values()) >= 1

    # AROMA keeps growing on top of the imported (frozen) rank
    _, grown, losses = train(model, cfg, loaded, fresh)
    after = fresh.ranks(fresh.finalize(grown))
    added = {p: after[p] - before[p] for p in before}
    print(f"ranks before {before}, added {added}; loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert all(v >= 0 for v in added.values()) and sum(added.values()) >= 1


@pytest.mark.slow
def test_lora_continues_training_the_imported_pair(tmp_path):
    model = NativeCausalLM(NativeConfig.from_dict(TINY), seed=0)
    cfg = aroma_cfg(method="lora", r=2, max_steps=6)
    trainer, state, _ = train(model, cfg)
    final = trainer.finalize(state)
    x = next(batches(1))
    peft_dir = write_peft(trainer, final, tmp_path)
    fresh = AromaTrainer(trainer.loss_fn, model.params, cfg, donate=False)
    loaded = load_adapter(fresh, fresh.init(model.params), peft_dir)
    np.testing.assert_allclose(
        logits(model, fresh, loaded, x), logits(model, trainer, final, x), atol=1e-5
    )
    # the trained pair itself, not a fresh one: LoRA's next step continues from it
    q = "model/layers/0/self_attn/q_proj"
    pair = fresh.unstacked(loaded.adapters).pairs[q]
    np.testing.assert_allclose(pair.b, trainer.unstacked(final.adapters).frozen[q].b[:2])
    _, more, losses = train(model, cfg, loaded, fresh)
    assert np.isfinite(losses).all() and fresh.ranks(fresh.finalize(more))[q] == 2
    with pytest.raises(PeftImportError, match="aroma.r=2"):
        other = AromaTrainer(trainer.loss_fn, model.params, cfg.replace(r=4), donate=False)
        load_adapter(other, other.init(model.params), peft_dir)


@pytest.fixture(scope="module")
def torch_peft(tmp_path_factory):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import transformers

    root = tmp_path_factory.mktemp("pt")
    torch.manual_seed(0)
    hf_cfg = {k: v for k, v in TINY.items() if k != "model_type"}
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_cfg)).eval()
    base.save_pretrained(root / "base")
    lora = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={"layers.1.self_attn.q_proj": 3},
        use_rslora=True,
        init_lora_weights=False,  # random B too, so the adapter changes the logits
        modules_to_save=["lm_head"],
    )
    pm = peft.get_peft_model(base, lora).eval()
    with torch.no_grad():  # a trained-looking head, so modules_to_save matters
        pm.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    pm.save_pretrained(root / "adapter")
    x = next(batches(1))
    with torch.no_grad():
        want = pm(torch.tensor(x["input_ids"]).long()).logits.numpy()
        plain = pm.get_base_model()
        with pm.disable_adapter():
            base_logits = plain(torch.tensor(x["input_ids"]).long()).logits.numpy()
    return root, x, want, base_logits


def test_real_peft_adapter_matches_pytorch(torch_peft):
    root, x, want, base_logits = torch_peft
    model = NativeCausalLM.from_pretrained(root / "base")
    cfg = aroma_cfg()
    trainer = AromaTrainer(objectives.causal_lm(model)[0], model.params, cfg, donate=False)
    state = load_adapter(trainer, trainer.init(model.params), root / "adapter")
    got = logits(model, trainer, state, x)
    err = np.abs(got - want).max()
    print(f"real peft adapter: max |native - PyTorch PEFT| = {err:.2e}")
    assert err < 1e-4
    assert np.abs(base_logits - want).max() > 1e-2  # the adapter does change the output
    ranks = trainer.ranks(state)
    assert ranks["model/layers/0/self_attn/q_proj"] == 4
    assert ranks["model/layers/0/self_attn/v_proj"] == 2


def test_refusals_name_the_module_and_shapes(torch_peft, tmp_path):
    root, *_ = torch_peft
    adapter = read_adapter(root / "adapter")
    wide = NativeCausalLM(NativeConfig.from_dict({**TINY, "hidden_size": 48}))
    tr = AromaTrainer(objectives.causal_lm(wide)[0], wide.params, aroma_cfg(), donate=False)
    with pytest.raises(PeftImportError, match=r"q_proj.*\(4, 32\).*expected lora_A \(4, 48\)"):
        load_adapter(tr, tr.init(wide.params), adapter)
    short = NativeCausalLM(NativeConfig.from_dict({**TINY, "num_hidden_layers": 1}))
    tr = AromaTrainer(objectives.causal_lm(short)[0], short.params, aroma_cfg(), donate=False)
    with pytest.raises(PeftImportError, match="layers.1.self_attn.*does not exist"):
        load_adapter(tr, tr.init(short.params), adapter)
    model = NativeCausalLM.from_pretrained(root / "base")
    tr = AromaTrainer(
        objectives.causal_lm(model)[0], model.params, aroma_cfg(target_modules=("q_proj",))
    )
    with pytest.raises(PeftImportError, match="v_proj' is not a target"):
        load_adapter(tr, tr.init(model.params), adapter)
    cfg = json.loads((root / "adapter" / "adapter_config.json").read_text())
    for change, message in (({"use_dora": True}, "use_dora"), ({"peft_type": "IA3"}, "IA3")):
        (tmp_path / "bad").mkdir(exist_ok=True)
        (tmp_path / "bad" / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
        (tmp_path / "bad" / "adapter_model.safetensors").write_bytes(
            (root / "adapter" / "adapter_model.safetensors").read_bytes()
        )
        with pytest.raises(PeftImportError, match=message):
            read_adapter(tmp_path / "bad")


@pytest.mark.slow
def test_cli_init_adapter_and_eval_adapter(fake_assets, tmp_path, capsys):
    """The runner path: a LoRA run's PEFT export scored by `eval --adapter`, then an AROMA run
    started from it with `--init-adapter` keeps its rank and grows; a bad adapter directory is
    a one-line CLI error."""
    from aroma_jax import cli
    from aroma_jax.train import run_config, runner
    from aroma_jax.train.export import export_peft

    fast = [
        "train.progress=false",
        "task.max_train_examples=64",
        "task.max_eval_examples=16",
        "train.batch_size=8",
        "aroma.inner_max_steps=4",
        "aroma.inner_check_every=2",
        "aroma.outer_tol=1e-4",
        "optimizer.warmup_steps=1",
        "aroma.rewarmup_steps=1",
    ]
    lora = run_config.load(
        None,
        fast + ["aroma.method=lora", "aroma.r=2", "aroma.max_steps=6", "model.name=tiny-roberta"],
    )
    s1 = runner.train(lora, tmp_path / "lora")
    export_peft(tmp_path / "lora", tmp_path / "peft")
    scored = runner.evaluate_only(lora, tmp_path / "lora", "validation", tmp_path / "peft")
    assert set(scored) >= {"accuracy"}
    on_top = run_config.load(
        None,
        fast
        + [
            "aroma.max_steps=12",
            "model.name=tiny-roberta",
            f"model.init_adapter={tmp_path / 'peft'}",
        ],
    )
    s2 = runner.train(on_top, tmp_path / "aroma")
    print(f"imported rank {s1['total_rank']}, after AROMA {s2['total_rank']}")
    assert s2["total_rank"] > s1["total_rank"] > 0
    code = cli.main(
        [
            "train",
            "--no-progress",
            "--set",
            "model.name=tiny-roberta",
            "--init-adapter",
            str(tmp_path / "nowhere"),
            "--output",
            str(tmp_path / "x"),
        ]
    )
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after library warnings
    assert code == 2 and last.startswith("aroma-jax train: error:")
    assert "not a PEFT adapter directory" in last


def _synthetic_peft(out, rank: int, scale: float):
    """A PEFT LoRA directory for layer 0's q_proj of `TINY` (in 32, out 32), factors seeded."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(rank, 32)), rng.normal(size=(32, rank))
    name = "base_model.model.model.layers.0.self_attn.q_proj"
    out.mkdir()
    save_file(
        {
            f"{name}.lora_A.weight": a.astype(np.float32),
            f"{name}.lora_B.weight": b.astype(np.float32),
        },
        str(out / "adapter_model.safetensors"),
    )
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": scale * rank,
        "target_modules": ["q_proj"],
    }
    (out / "adapter_config.json").write_text(json.dumps(config))
    return a.T * scale, b.T  # (in, k) with PEFT's scale carried, (k, out)


def test_the_import_is_the_methods_hook_and_a_plug_in_inherits_it(tmp_path):
    """`load_adapter` asks the run's method (`Method.import_lora`): the example plug-in (an
    Aroma subclass, named by dotted path) takes the adapter as merged factors exactly like AROMA;
    a method without the hook (DoRA) is refused, naming the methods that have one."""
    from aroma_jax.core.methods.base import imports_lora

    model = NativeCausalLM(NativeConfig.from_dict(TINY), seed=0)
    loss_fn, _ = objectives.causal_lm(model)
    a, b = _synthetic_peft(tmp_path / "peft", rank=3, scale=1.5)
    q = "model/layers/0/self_attn/q_proj"
    got = {}
    for method in ("aroma", "aroma_jax.examples.custom_method:GrowWhileRatioHolds"):
        cfg = aroma_cfg(method=method)
        trainer = AromaTrainer(loss_fn, model.params, cfg, donate=False)
        state = load_adapter(trainer, trainer.init(model.params), tmp_path / "peft")
        entries = trainer.unstacked(state.adapters)
        assert int(entries.merges[q]) == 3  # ceil(3 / r=1) slots counted as merges
        fa, fb = np.asarray(entries.frozen[q].a), np.asarray(entries.frozen[q].b)
        np.testing.assert_allclose(fa[:, :3] * cfg.scale, a, rtol=1e-6)  # s * A = PEFT's
        np.testing.assert_allclose(fb[:3], b, rtol=1e-6)
        assert not fa[:, 3:].any() and int(entries.merges["model/layers/1/self_attn/q_proj"]) == 0
        got[method] = trainer.ranks(state)
    assert got["aroma"] == got["aroma_jax.examples.custom_method:GrowWhileRatioHolds"]
    assert imports_lora(aroma_cfg(method="lora").plugin)
    dora = AromaTrainer(loss_fn, model.params, aroma_cfg(method="dora"), donate=False)
    with pytest.raises(PeftImportError, match=r"method in \('aroma', 'lora', 'relora'.*'dora'"):
        load_adapter(dora, dora.init(model.params), tmp_path / "peft")

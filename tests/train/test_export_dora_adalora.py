"""DoRA and AdaLoRA exports loaded by the real PEFT, and AutoPeftModel on a local base."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from roberta_tiny import IMPLS, save_base, tiny_roberta
from safetensors.numpy import save_file

from aroma_jax import AromaConfig, AromaTrainer
from aroma_jax.train import artifacts
from aroma_jax.train.export import base_model_id, merged_params, peft_files

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = ("query", "value", "intermediate/dense")
METHODS = {
    "dora": dict(method="dora", r=2, alpha=4.0),
    "adalora": dict(method="adalora", init_r=3, target_r=1, tinit=2, tfinal=3, delta_t=1),
}


def batch(seed, n=8, length=12):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 120, (n, length)).astype(np.int32)
    ids[:, 0] = 0
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": rng.integers(0, 3, n)}


@pytest.fixture(scope="module", params=sorted(METHODS))
def method(request):
    return request.param


@pytest.fixture(scope="module", params=IMPLS)
def trained(request, method, tmp_path_factory):
    model = tiny_roberta(request.param)[1]
    params = jax.tree.map(jnp.array, model.params)

    def loss_fn(p, b, rng):
        logits = model(b["input_ids"], b["attention_mask"], params=p, train=False).logits
        return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), b["labels"][:, None], -1))

    acfg = AromaConfig(
        target_modules=TARGETS,
        train_patterns=("classifier",),
        learning_rate=2e-2,
        max_steps=12,
        warmup_steps=2,
        **METHODS[method],
    )
    trainer = AromaTrainer(loss_fn, params, acfg)
    state = trainer.init(params)
    for i in range(12):
        state, _ = trainer.step(state, batch(i))
    final = trainer.finalize(state)
    out = tmp_path_factory.mktemp(method)
    artifacts.save_final(out / "final", trainer, final)
    return method, model, trainer, final, out


def flax_logits(model, trainer, state, b):
    with trainer.applied(state) as p:
        return np.asarray(model(b["input_ids"], b["attention_mask"], params=p).logits)


def write_peft(tensors, meta, directory, base):
    config, state = peft_files(
        tensors, meta, lambda p: p.replace("/", "."), base, "SEQ_CLS", ["classifier"]
    )
    directory.mkdir()
    save_file(state, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return config


def pt_logits(pm, b):
    with torch.no_grad():
        return pm(
            input_ids=torch.tensor(b["input_ids"]).long(),
            attention_mask=torch.tensor(b["attention_mask"]),
        ).logits.numpy()


def test_artifact_roundtrip(trained):
    method, model, trainer, final, out = trained
    rebuilt = artifacts.rebuild_state(trainer, model.params, out / "final")
    b = batch(99)
    np.testing.assert_allclose(
        flax_logits(model, trainer, rebuilt, b), flax_logits(model, trainer, final, b), atol=1e-5
    )
    assert trainer.ranks(rebuilt) == trainer.ranks(final)


def test_merged_export_matches(trained):
    method, model, trainer, final, out = trained
    tensors, meta = artifacts.load_final(out / "final")
    merged = merged_params(model.params, tensors, meta)
    b = batch(5)
    got = np.asarray(model(b["input_ids"], b["attention_mask"], params=merged).logits)
    np.testing.assert_allclose(got, flax_logits(model, trainer, final, b), atol=1e-4)


def test_base_model_id_names_a_loadable_base(tmp_path):
    assert base_model_id("minilm") == "sentence-transformers/all-MiniLM-L6-v2"
    assert base_model_id("smollm2") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model_id("org/model") == "org/model"
    (tmp_path / "base").mkdir()
    rel = tmp_path / "base" / ".." / "base"
    assert base_model_id(str(rel)) == str((tmp_path / "base").resolve())


def test_auto_peft_model_loads_the_export_on_a_local_base(trained, tmp_path):
    # What a PEFT user does: AutoPeftModel finds the base through base_model_name_or_path.
    method, model, trainer, final, out = trained
    save_base(model, model.params, tmp_path / "base")
    tensors, meta = artifacts.load_final(out / "final")
    config = write_peft(tensors, meta, tmp_path / "peft", base_model_id(str(tmp_path / "base")))
    assert config["base_model_name_or_path"] == str((tmp_path / "base").resolve())
    if method == "dora":
        assert config["use_dora"] is True and config["peft_type"] == "LORA"
    else:
        assert config["peft_type"] == "ADALORA"
        ranks = {k[: -len(".lora_E")]: sum(v) for k, v in config["rank_pattern"].items()}
        want = {p.replace("/", "."): r for p, r in trainer.ranks(final).items() if r}
        assert ranks == want and len(set(ranks.values())) > 1  # the budget was re-allocated
    pm = peft.AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "peft").eval()
    b = batch(3)
    want = flax_logits(model, trainer, final, b)
    np.testing.assert_allclose(pt_logits(pm, b), want, atol=1e-4)
    plain = np.asarray(model(b["input_ids"], b["attention_mask"], params=model.params).logits)
    assert np.abs(plain - want).max() > 1e-2  # the adapters changed the model

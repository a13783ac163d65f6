"""Exports against the real consumers: HF PEFT on the PyTorch model, and save_pretrained."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from roberta_tiny import IMPLS, save_base, tiny_roberta

from aroma_jax import AromaConfig, AromaTrainer
from aroma_jax.train import artifacts
from aroma_jax.train.export import merged_params, peft_files

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = ("query", "value", "attention/output/dense", "intermediate/dense", "output/dense")


def batch(seed, n=8, length=12):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 120, (n, length)).astype(np.int32)
    ids[:, 0] = 0
    return {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "labels": rng.integers(0, 3, n).astype(np.int32),
    }


@pytest.fixture(scope="module", params=IMPLS)
def trained(request, tmp_path_factory):
    cfg, model = tiny_roberta(request.param)
    params = jax.tree.map(jnp.array, model.params)  # the state will own (donate) a copy

    def loss_fn(p, b, rng):
        logits = model(b["input_ids"], b["attention_mask"], params=p, train=False).logits
        return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), b["labels"][:, None], -1))

    acfg = AromaConfig(
        target_modules=TARGETS,
        train_patterns=("classifier",),
        r=1,
        alpha=4.0,
        learning_rate=1e-2,
        inner_max_steps=6,
        outer_tol=1e-4,
        max_steps=20,
        warmup_steps=2,
        rewarmup_steps=2,
    )
    trainer = AromaTrainer(loss_fn, params, acfg)
    state = trainer.init(params)
    for i in range(20):
        state, _ = trainer.step(state, batch(i))
    final = trainer.finalize(state)
    out = tmp_path_factory.mktemp("run")
    artifacts.save_final(out / "final", trainer, final)
    return cfg, model, trainer, final, out


def flax_logits(model, trainer, state, b):
    with trainer.applied(state) as p:
        return np.asarray(model(b["input_ids"], b["attention_mask"], params=p).logits)


def test_final_artifact_roundtrip(trained):
    cfg, model, trainer, final, out = trained
    ranks = trainer.ranks(final)
    assert sum(ranks.values()) > len(ranks)  # several merges happened
    rebuilt = artifacts.rebuild_state(trainer, model.params, out / "final")
    b = batch(99)
    np.testing.assert_allclose(
        flax_logits(model, trainer, rebuilt, b), flax_logits(model, trainer, final, b), atol=1e-5
    )


def test_merged_export_loads_in_ours_and_pytorch(trained, tmp_path):
    cfg, model, trainer, final, out = trained
    tensors, meta = artifacts.load_final(out / "final")
    merged = merged_params(model.params, tensors, meta)
    save_base(model, merged, tmp_path / "merged")
    model.save_pretrained(tmp_path / "merged", params=merged)
    b = batch(7)
    want = flax_logits(model, trainer, final, b)
    again = type(model).from_pretrained(tmp_path / "merged")  # our own loader reads it back
    got = np.asarray(again(b["input_ids"], b["attention_mask"]).logits)
    np.testing.assert_allclose(got, want, atol=1e-4)
    pt = transformers.RobertaForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        got_pt = pt(
            torch.tensor(b["input_ids"]).long(), attention_mask=torch.tensor(b["attention_mask"])
        ).logits.numpy()
    np.testing.assert_allclose(got_pt, want, atol=1e-4)


def test_peft_export_matches_flax_logits(trained, tmp_path):
    cfg, model, trainer, final, out = trained
    tensors, meta = artifacts.load_final(out / "final")
    config, state = peft_files(
        tensors, meta, lambda p: p.replace("/", "."), "tiny-roberta", "SEQ_CLS", ["classifier"]
    )
    assert all(v.dtype == np.float32 for v in state.values())
    zero = [p for p, r in meta["ranks"].items() if r == 0]
    assert all(p.replace("/", ".") not in config["target_modules"] for p in zero)
    from safetensors.numpy import save_file

    (tmp_path / "peft").mkdir()
    save_file(
        state, str(tmp_path / "peft" / "adapter_model.safetensors"), metadata={"format": "pt"}
    )
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(config))
    # The PyTorch base: the pretrained (unadapted) weights.
    save_base(model, model.params, tmp_path / "base")
    base = transformers.RobertaForSequenceClassification.from_pretrained(tmp_path / "base")
    pm = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    b = batch(11)
    with torch.no_grad():
        got = pm(
            input_ids=torch.tensor(b["input_ids"]).long(),
            attention_mask=torch.tensor(b["attention_mask"]),
        ).logits.numpy()
    want = flax_logits(model, trainer, final, b)
    np.testing.assert_allclose(got, want, atol=1e-4)
    # ...and the adapters and the head really changed the model (the check can fail).
    plain = np.asarray(model(b["input_ids"], b["attention_mask"], params=model.params).logits)
    assert np.abs(plain - want).max() > 1e-2

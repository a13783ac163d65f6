"""AROMA on the native BERT / RoBERTa against the same run on HF's Flax classes (transformers
4.x, where those classes exist), ``model.impl`` selection, and a merged export of a native
RoBERTa run loaded by PyTorch transformers."""

import numpy as np
import pytest
import transformers

from aroma_jax import AromaConfig, AromaTrainer
from aroma_jax.data import objectives
from aroma_jax.models import hf
from aroma_jax.models.native.bert import EncoderConfig
from aroma_jax.models.native.encoder_model import NativeEncoder

# all-MiniLM-L6-v2's shape (hidden 384, 12 heads, FFN 1536, exact GELU, eps 1e-12) with two
# layers, a small vocabulary and no dropout, so both runs see the same deterministic losses
MINILM = dict(
    vocab_size=512,
    hidden_size=384,
    num_hidden_layers=2,
    num_attention_heads=12,
    intermediate_size=1536,
    hidden_act="gelu",
    layer_norm_eps=1e-12,
    max_position_embeddings=64,
    type_vocab_size=2,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    num_labels=2,
)


def batches(n, vocab=512):
    for i in range(n):
        rng = np.random.default_rng(i % 2)  # two batches in turn: the loss can fall
        ids = rng.integers(5, vocab, (8, 16)).astype(np.int32)
        labels = (ids[:, 1] % 2).astype(np.int32)  # learnable from the first word
        mask = np.ones_like(ids)
        mask[::2, 12:] = 0
        types = np.zeros_like(ids)
        types[:, 8:] = 1
        yield {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels}


def aroma_cfg(steps, head="classifier", **method):
    return AromaConfig(
        target_modules=(*hf.PRESETS["bert"], head),
        **{"r": 1, "alpha": 2.0, **method},
        learning_rate=5e-3,
        max_steps=steps,
        inner_max_steps=4,
        inner_check_every=2,
        outer_tol=1e-4,
        warmup_steps=2,
        rewarmup_steps=2,
    )


def run(model, params, steps=14, **method):
    loss_fn, _ = objectives.classification(model)
    trainer = AromaTrainer(loss_fn, params, aroma_cfg(steps, **method), donate=False)
    state = trainer.init(params)
    losses, ranks = [], []
    for batch in batches(steps):
        state, info = trainer.step(state, batch)
        losses.append(float(info.loss))
        ranks.append(np.asarray(info.ranks).tolist())
    return np.asarray(losses), ranks, trainer.paths


@pytest.mark.slow
@pytest.mark.hf4
def test_aroma_run_on_native_minilm_shape_equals_hf_flax_bert():
    cfg = transformers.BertConfig(**MINILM)
    flax_model = transformers.FlaxBertForSequenceClassification(cfg, seed=0)
    native = NativeEncoder(EncoderConfig.from_dict(cfg.to_dict()), params=flax_model.params)
    hf_loss, hf_ranks, hf_paths = run(flax_model, flax_model.params)
    nat_loss, nat_ranks, nat_paths = run(native, flax_model.params)
    print(
        f"max |loss native - loss hf flax| over {len(hf_loss)} steps: "
        f"{np.abs(nat_loss - hf_loss).max():.2e}; ranks {nat_ranks[-1]}"
    )
    assert nat_paths == hf_paths and len(nat_paths) == 2 * 6 + 1
    assert nat_ranks == hf_ranks  # at every outer step
    assert max(hf_ranks[-1]) >= 2  # outer steps merged: the comparison has teeth
    np.testing.assert_allclose(nat_loss, hf_loss, atol=1e-4, rtol=0)
    assert hf_loss[-1] < hf_loss[0]


@pytest.mark.slow
@pytest.mark.hf4
def test_lora_r8_run_on_native_minilm_shape_equals_hf_flax_bert():
    """LoRA r=8 (the demo's baseline) takes the same steps on both paths: the demo's native and
    HF Flax LoRA runs differ only by their dropout masks, which the two models draw differently."""
    cfg = transformers.BertConfig(**MINILM)
    flax_model = transformers.FlaxBertForSequenceClassification(cfg, seed=0)
    native = NativeEncoder(EncoderConfig.from_dict(cfg.to_dict()), params=flax_model.params)
    lora = dict(method="lora", r=8, alpha=16.0)
    hf_loss, _, hf_paths = run(flax_model, flax_model.params, **lora)
    nat_loss, _, nat_paths = run(native, flax_model.params, **lora)
    print(f"LoRA r=8: max |loss native - loss hf flax|: {np.abs(nat_loss - hf_loss).max():.2e}")
    assert nat_paths == hf_paths
    np.testing.assert_allclose(nat_loss, hf_loss, atol=1e-4, rtol=0)
    assert hf_loss[-1] < 0.5 * hf_loss[0]  # it learns


def test_impl_selection(fake_assets):
    from aroma_jax.data import tasks

    task = tasks.limit(tasks.get_task("rotten_tomatoes", seed=0), 32, 8)
    loaded = hf.load_for_task("tiny-bert", task, remat="full")  # auto: native, scanned
    assert isinstance(loaded.model, NativeEncoder) and loaded.arch == "bert"
    assert loaded.model.config.num_labels == task.num_labels
    assert loaded.stacked == {"bert/encoder/layer": 2}
    assert loaded.model.module.remat == "full"
    unrolled = hf.load_for_task("tiny-roberta", task, scan_layers=False)
    assert unrolled.stacked == {} and "0" in unrolled.params["roberta"]["encoder"]["layer"]


@pytest.mark.hf4
def test_impl_hf_builds_the_flax_class(fake_assets):
    from aroma_jax.data import tasks

    task = tasks.limit(tasks.get_task("rotten_tomatoes", seed=0), 32, 8)
    flax_model = hf.load_for_task("tiny-roberta", task, impl="hf").model
    assert type(flax_model).__name__ == "FlaxRobertaForSequenceClassification"


@pytest.mark.slow
def test_merged_export_of_a_native_roberta_run_loads_in_pytorch(tmp_path):
    """`aroma-jax export --merged` of a native RoBERTa run: merged weights and the trained head
    in PyTorch layout; AutoModelForSequenceClassification loads them and agrees within 1e-4."""
    torch = pytest.importorskip("torch")
    from aroma_jax.train import artifacts
    from aroma_jax.train.export import merged_params, save_pytorch_weights

    cfg = EncoderConfig.from_dict(
        {
            **MINILM,
            "model_type": "roberta",
            "hidden_size": 32,
            "num_attention_heads": 4,
            "intermediate_size": 48,
            "pad_token_id": 1,
        }
    )
    model = NativeEncoder(cfg, seed=0, scan_layers=True)
    loss_fn, _ = objectives.classification(model)
    acfg = aroma_cfg(8, head="classifier/dense")  # train.head: paper
    trainer = AromaTrainer(loss_fn, model.params, acfg, stacked=hf.stacked_of(model), donate=False)
    state = trainer.init(model.params)
    for b in batches(8):
        state, info = trainer.step(state, b)
    final = trainer.finalize(state)
    artifacts.save_final(tmp_path / "final", trainer, final)
    tensors, meta = artifacts.load_final(tmp_path / "final")
    merged = merged_params(model.params, tensors, meta)
    assert save_pytorch_weights(model, merged, tmp_path / "merged") is None  # written natively
    model.save_pretrained(tmp_path / "merged", params=merged)
    pt = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    x = next(batches(1))
    with trainer.applied(final) as p:
        want = np.asarray(
            model(x["input_ids"], x["attention_mask"], x["token_type_ids"], params=p).logits
        )
    with torch.no_grad():
        got = pt.eval()(
            *(torch.tensor(x[k]).long() for k in ("input_ids", "attention_mask", "token_type_ids"))
        ).logits.numpy()
    base = np.asarray(model(x["input_ids"], x["attention_mask"], x["token_type_ids"]).logits)
    print(
        f"merged export: max |torch - native| {np.abs(got - want).max():.2e}, "
        f"change by training {np.abs(want - base).max():.2e}; ranks {np.asarray(info.ranks)}"
    )
    assert np.abs(want - base).max() > 1e-3  # training moved the logits: the test has teeth
    np.testing.assert_allclose(got, want, atol=1e-4)

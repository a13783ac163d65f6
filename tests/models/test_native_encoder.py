"""The native BERT / RoBERTa classifiers against PyTorch transformers (whichever version is
installed: 5.x in `make test`).

Each case saves a tiny random PyTorch ``*ForSequenceClassification`` with ``save_pretrained``,
loads it with the native loader (no torch involved) and compares fp32 logits on a batch with
right padding and two token types.
"""

import numpy as np
import pytest
import transformers

from aroma_jax.data import offline
from aroma_jax.models.native import NativeConfigError
from aroma_jax.models.native.bert import BaseModel, EncoderConfig
from aroma_jax.models.native.encoder_model import NativeEncoder

torch = pytest.importorskip("torch")

TINY = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=40,
    max_position_embeddings=64,
)
CASES = {
    "bert": ("bert", dict(num_labels=3)),
    "bert_regression_gelu_new": ("bert", dict(num_labels=1, hidden_act="gelu_new")),
    "roberta": ("roberta", dict(num_labels=2)),
    "roberta_one_type_relu": ("roberta", dict(num_labels=4, type_vocab_size=1, hidden_act="relu")),
}


def build(case, out):
    kind, kw = CASES[case]
    cfg_cls = transformers.BertConfig if kind == "bert" else transformers.RobertaConfig
    cls = (
        transformers.BertForSequenceClassification
        if kind == "bert"
        else transformers.RobertaForSequenceClassification
    )
    cfg = cfg_cls(**{**TINY, **kw})
    torch.manual_seed(0)
    pt = cls(cfg).eval()
    with torch.no_grad():  # random biases and norms, so a mapping mistake cannot hide
        for name, p in pt.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "LayerNorm.weight" in name else 0.0))
            elif "classifier" in name or "pooler" in name:  # logits of order 1
                p.copy_(torch.randn_like(p) * 0.5)
    pt.save_pretrained(out)
    return pt


def batch(pad, types=2):
    x = np.random.default_rng(0).integers(3, 99, (3, 13))
    mask = np.ones_like(x)
    mask[1, -5:] = 0
    mask[2, -1:] = 0
    x[mask == 0] = pad
    tt = np.zeros_like(x)
    if types > 1:
        tt[:, 7:] = 1
    return x, mask, tt


def torch_logits(pt, x, mask, tt):
    with torch.no_grad():
        return pt(
            torch.tensor(x), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(tt)
        ).logits.numpy()


@pytest.mark.parametrize(
    "case,scan",
    [
        ("bert", False),
        ("bert_regression_gelu_new", True),
        ("roberta", True),
        ("roberta_one_type_relu", False),
    ],
)
def test_native_encoder_logits_match_pytorch(case, scan, tmp_path):
    pt = build(case, tmp_path)
    x, mask, tt = batch(pt.config.pad_token_id, pt.config.type_vocab_size)
    want = torch_logits(pt, x, mask, tt)
    model = NativeEncoder.from_pretrained(tmp_path, scan_layers=scan)
    got = np.asarray(model(x, attention_mask=mask, token_type_ids=tt).logits)
    err = np.abs(got - want).max()
    print(
        f"{case} scan={scan} (transformers {transformers.__version__}): max |native - torch| "
        f"= {err:.2e}"
    )
    assert got.shape == want.shape and err < 1e-4
    # the mask and the token types change the logits by more than the tolerance, so the
    # comparison above tested them
    assert np.abs(np.asarray(model(x, token_type_ids=tt).logits) - want)[1].max() > 1e-4
    if pt.config.type_vocab_size > 1:
        assert np.abs(np.asarray(model(x, attention_mask=mask).logits) - want).max() > 1e-4


def test_head_param_names_follow_hf(tmp_path):
    build("roberta", tmp_path / "r")
    build("bert", tmp_path / "b")
    r = NativeEncoder.from_pretrained(tmp_path / "r").params
    b = NativeEncoder.from_pretrained(tmp_path / "b", scan_layers=True).params
    assert set(r["classifier"]) == {"dense", "out_proj"} and "pooler" not in r["roberta"]
    assert set(b["classifier"]) == {"kernel", "bias"} and "dense" in b["bert"]["pooler"]
    q = b["bert"]["encoder"]["layer"]["attention"]["self"]["query"]["kernel"]
    assert q.shape == (2, 32, 32)  # stacked layers
    assert "scale" in r["roberta"]["encoder"]["layer"]["1"]["output"]["LayerNorm"]


def test_save_pretrained_loads_in_pytorch(tmp_path):
    build("roberta", tmp_path / "src")
    model = NativeEncoder.from_pretrained(tmp_path / "src", scan_layers=True)
    model.save_pretrained(tmp_path / "out")
    pt = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    assert type(pt).__name__ == "RobertaForSequenceClassification"
    x, mask, tt = batch(1)
    got = np.asarray(model(x, attention_mask=mask, token_type_ids=tt).logits)
    np.testing.assert_allclose(got, torch_logits(pt, x, mask, tt), atol=1e-4)


def test_dropout_only_when_training(tmp_path):
    build("bert", tmp_path)
    model = NativeEncoder.from_pretrained(tmp_path)
    x, mask, tt = batch(0)
    import jax

    key = jax.random.key(3)
    ev = np.asarray(model(x, mask, tt).logits)
    tr = np.asarray(model(x, mask, tt, train=True, dropout_rng=key).logits)
    tr2 = np.asarray(model(x, mask, tt, train=True, dropout_rng=key).logits)
    assert np.abs(tr - ev).max() > 1e-3 and np.array_equal(tr, tr2)
    no_drop = model.config.replace(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    quiet = NativeEncoder(no_drop, model.params)
    np.testing.assert_allclose(
        np.asarray(quiet(x, mask, tt, train=True, dropout_rng=key).logits), ev, atol=1e-6
    )


def test_bf16_compute_and_new_head(tmp_path):
    build("roberta", tmp_path)
    x, mask, tt = batch(1)
    f32 = NativeEncoder.from_pretrained(tmp_path)
    bf16 = NativeEncoder.from_pretrained(tmp_path, dtype="bfloat16", param_dtype="bfloat16")
    a = np.asarray(f32(x, mask, tt).logits)
    b = np.asarray(bf16(x, mask, tt).logits, np.float32)
    assert bf16.params["classifier"]["dense"]["kernel"].dtype.name == "bfloat16"
    assert np.abs(a - b).max() < 0.05 * max(1.0, np.abs(a).max())
    five = NativeEncoder.from_pretrained(tmp_path, num_labels=5, seed=1)  # head re-initialised
    assert five(x, mask, tt).logits.shape == (3, 5)
    np.testing.assert_array_equal(
        five.params["roberta"]["embeddings"]["word_embeddings"]["embedding"],
        f32.params["roberta"]["embeddings"]["word_embeddings"]["embedding"],
    )


def test_rejects_unsupported_configs():
    base = {**TINY, "model_type": "bert"}
    with pytest.raises(NativeConfigError, match="accepted 'absolute'"):
        EncoderConfig.from_dict({**base, "position_embedding_type": "relative_key"})
    with pytest.raises(NativeConfigError, match="hidden_act 'gelu_10'"):
        EncoderConfig.from_dict({**base, "hidden_act": "gelu_10"})
    with pytest.raises(NativeConfigError, match="accepted"):
        EncoderConfig.from_dict({**base, "model_type": "deberta"})


def _minilm():
    try:
        return offline.asset_path("minilm")
    except FileNotFoundError:
        return None


@pytest.mark.slow
@pytest.mark.skipif(_minilm() is None, reason="the MiniLM asset is not fetched ($AROMA_DATA)")
def test_minilm_asset_matches_pytorch(tmp_path):
    """The asset as shipped (a bare BertModel, no ``bert.`` prefix) and a classifier on it."""
    path = _minilm()
    x, mask, tt = batch(0)
    x = x * 300  # ids across the 30522-word vocabulary
    base = transformers.BertModel.from_pretrained(path).eval()
    with torch.no_grad():
        out = base(torch.tensor(x), attention_mask=torch.tensor(mask))
    model = NativeEncoder.from_pretrained(path, num_labels=2)
    c = model.config
    hidden, pooled = BaseModel(c).apply({"params": model.params["bert"]}, x, mask)
    err_h = np.abs(np.asarray(hidden) - out.last_hidden_state.numpy())[mask == 1].max()
    err_p = np.abs(np.asarray(pooled) - out.pooler_output.numpy()).max()
    pt = transformers.BertForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    pt.save_pretrained(tmp_path)
    head = NativeEncoder.from_pretrained(tmp_path)
    err_l = np.abs(np.asarray(head(x, mask, tt).logits) - torch_logits(pt, x, mask, tt)).max()
    print(
        f"MiniLM: max |native - torch| hidden {err_h:.2e}, pooled {err_p:.2e}, logits {err_l:.2e}"
    )
    assert max(err_h, err_p, err_l) < 1e-4


@pytest.mark.slow
def test_sharding_rules_cover_encoder_layers_and_keep_logits(tmp_path):
    """Every layer kernel has logical axes (unrolled and scanned); a forward pass with the
    params sharded by them on an fsdp x tensor mesh gives the unsharded logits."""
    import jax
    from flax import traverse_util
    from jax.sharding import PartitionSpec as P

    from aroma_jax.core import sharding
    from aroma_jax.models.native.partitioning import param_logical_axes, sharding_rules

    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    cfg = EncoderConfig.from_dict({**TINY, "model_type": "roberta", "num_labels": 3})
    x, mask, tt = batch(1)
    mesh = sharding.parse_mesh("fsdp=4,tensor=2", jax.devices()[:8])
    for scan in (False, True):
        model = NativeEncoder(cfg, scan_layers=scan)
        flat = traverse_util.flatten_dict(model.params, sep="/")
        layer_kernels = [k for k in flat if "/layer/" in k and k.endswith("kernel")]
        assert len(layer_kernels) == 6 * (1 if scan else 2)
        for k in layer_kernels:
            assert len(param_logical_axes(k)) == flat[k].ndim, k
        specs = sharding.param_specs(model.params, mesh, sharding_rules())
        spec = traverse_util.flatten_dict(specs, sep="/")
        q = "roberta/encoder/layer/" + ("" if scan else "0/") + "attention/self/query/kernel"
        assert spec[q] == (P(None, "fsdp", "tensor") if scan else P("fsdp", "tensor"))
        placed = jax.tree.map(
            lambda a, s: jax.device_put(a, jax.sharding.NamedSharding(mesh, s)), model.params, specs
        )
        want = np.asarray(model(x, mask, tt).logits)
        np.testing.assert_allclose(
            np.asarray(model(x, mask, tt, params=placed).logits), want, atol=1e-5
        )

"""The native BART against PyTorch transformers (whichever version is installed): teacher-forced
logits, greedy and beam-search outputs token for token, save/load in PyTorch layout, and an
AROMA run on the paper's BART targets exported merged."""

import json

import numpy as np
import pytest
import transformers

from aroma_jax.models.native.bart import BartConfig
from aroma_jax.models.native.seq2seq_model import NativeSeq2SeqLM

torch = pytest.importorskip("torch")

TINY = dict(
    vocab_size=64,
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=48,
    decoder_ffn_dim=48,
    max_position_embeddings=64,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
    decoder_start_token_id=2,
    forced_bos_token_id=0,  # as bart-large-xsum
    forced_eos_token_id=2,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("bart")
    torch.manual_seed(0)
    pt = transformers.BartForConditionalGeneration(transformers.BartConfig(**TINY)).eval()
    with torch.no_grad():  # random biases, norms and logit bias, so no mapping mistake hides
        for name, p in pt.named_parameters():
            if name.endswith("bias") or "layer_norm" in name or "layernorm" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
            elif p.ndim == 2 and "embed_positions" not in name:
                # logits of a few units that depend on the input (rows decode differently)
                p.copy_(torch.randn_like(p) * (1.0 if "shared" in name else 0.25))
        pt.final_logits_bias.copy_(torch.randn_like(pt.final_logits_bias) * 0.1)
        pt.final_logits_bias[0, 2] += 3.0  # EOS likely enough to end hypotheses early
    pt.save_pretrained(out)
    # transformers 5 writes no forced_bos_token_id; bart-large-xsum's config.json has it
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "forced_bos_token_id": 0}))
    return pt, out


def inputs():
    rng = np.random.default_rng(0)
    x = rng.integers(3, 64, (3, 9))
    mask = np.ones_like(x)
    mask[1, -3:] = 0
    x[1, -3:] = 1
    y = rng.integers(3, 64, (3, 7))
    y[:, 0] = 2
    dmask = np.ones_like(y)
    dmask[2, -2:] = 0
    return x, mask, y, dmask


def torch_logits(pt, x, mask, y, dmask):
    with torch.no_grad():
        return pt(
            torch.tensor(x),
            attention_mask=torch.tensor(mask),
            decoder_input_ids=torch.tensor(y),
            decoder_attention_mask=torch.tensor(dmask),
        ).logits.numpy()


@pytest.mark.parametrize(
    "scan", [pytest.param(False, marks=pytest.mark.slow), True], ids=["unrolled", "scanned"]
)
def test_bart_logits_match_pytorch(checkpoint, scan):
    pt, path = checkpoint
    x, mask, y, dmask = inputs()
    want = torch_logits(pt, x, mask, y, dmask)
    model = NativeSeq2SeqLM.from_pretrained(path, scan_layers=scan)
    got = np.asarray(model(x, mask, y, dmask).logits)
    err = np.abs(got - want)[dmask == 1].max()
    print(
        f"BART scan={scan} (transformers {transformers.__version__}): max |native - torch| "
        f"= {err:.2e}"
    )
    assert err < 1e-4
    assert np.abs(np.asarray(model(x, None, y, dmask).logits) - want)[1].max() > 1e-4  # mask used
    assert model.config.forced_bos_token_id == 0 and model.config.forced_eos_token_id == 2


FORCED = dict(forced_bos_token_id=0, forced_eos_token_id=2)
UNFORCED = dict(forced_bos_token_id=None, forced_eos_token_id=None)
SEARCHES = {
    "greedy": dict(num_beams=1, max_length=12, **FORCED),
    "greedy_norepeat_minlen_unforced": dict(
        num_beams=1, max_length=12, no_repeat_ngram_size=2, min_length=5, **UNFORCED
    ),
    "beam3": dict(num_beams=3, max_length=12, **FORCED),
    "xsum_like": dict(
        num_beams=4,
        max_length=14,
        no_repeat_ngram_size=3,
        min_length=6,
        length_penalty=0.6,
        early_stopping=True,
        **FORCED,
    ),
    "never_lenpen2_unforced": dict(
        num_beams=3,
        max_length=10,
        early_stopping="never",
        length_penalty=2.0,
        no_repeat_ngram_size=2,
        **UNFORCED,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(SEARCHES))
def test_generate_is_token_identical_to_transformers(checkpoint, case):
    pt, path = checkpoint
    model = NativeSeq2SeqLM.from_pretrained(path)
    x, mask, _, _ = inputs()
    kw = SEARCHES[case]
    with torch.no_grad():
        want = pt.generate(torch.tensor(x), attention_mask=torch.tensor(mask), **kw).numpy()
    got = np.asarray(model.generate(x, mask, **kw).sequences)
    assert got.shape == (3, kw["max_length"])
    assert len({tuple(r) for r in got.tolist()}) > 1  # the rows decode differently
    padded = np.full(got.shape, TINY["pad_token_id"])
    padded[:, : want.shape[1]] = want
    print(f"{case}: {got.tolist()}")
    np.testing.assert_array_equal(got, padded)
    if kw["forced_bos_token_id"] == 0:
        assert (got[:, 1] == 0).all()


def test_greedy_cache_matches_teacher_forcing(checkpoint):
    """Each greedy token is the argmax of the uncached forward pass over the prefix."""
    _, path = checkpoint
    model = NativeSeq2SeqLM.from_pretrained(path)
    x, mask, _, _ = inputs()
    seqs = np.asarray(
        model.generate(
            x, mask, max_length=8, forced_bos_token_id=None, forced_eos_token_id=None
        ).sequences
    )
    logits = np.asarray(model(x, mask, seqs[:, :-1]).logits)
    live = np.cumsum(seqs[:, :-1] == 2, axis=1) - (seqs[:, :-1] == 2)  # before the first EOS
    live[:, 0] = 0
    np.testing.assert_array_equal(np.argmax(logits, -1)[live == 0], seqs[:, 1:][live == 0])


def test_save_pretrained_loads_in_pytorch(checkpoint, tmp_path):
    pt, path = checkpoint
    model = NativeSeq2SeqLM.from_pretrained(path, scan_layers=True)
    model.save_pretrained(tmp_path)
    back = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    x, mask, y, dmask = inputs()
    np.testing.assert_allclose(
        torch_logits(back, x, mask, y, dmask), torch_logits(pt, x, mask, y, dmask), atol=1e-5
    )


def test_rejects_pre_ln_and_sampling(checkpoint):
    from aroma_jax.models.native import NativeConfigError

    with pytest.raises(NativeConfigError, match="normalize_before"):
        BartConfig.from_dict({**TINY, "model_type": "bart", "normalize_before": True})
    model = NativeSeq2SeqLM.from_pretrained(checkpoint[1])
    with pytest.raises(ValueError, match="do_sample"):
        model.generate(np.ones((1, 3), np.int32), do_sample=True)


@pytest.mark.slow
def test_aroma_on_bart_targets_cross_attention_and_merged_export(checkpoint, tmp_path):
    """The paper's BART preset adapts q, k, v, out, fc1, fc2 in every block, cross-attention
    included; the merged export of the run loads in PyTorch and agrees within 1e-4."""
    from aroma_jax import AromaConfig, AromaTrainer
    from aroma_jax.data import objectives
    from aroma_jax.models import hf
    from aroma_jax.train import artifacts
    from aroma_jax.train.export import merged_params

    _, path = checkpoint
    model = NativeSeq2SeqLM.from_pretrained(path, scan_layers=True)
    loss_fn, _ = objectives.seq2seq(model)
    cfg = AromaConfig(
        target_modules=hf.PRESETS["bart"],
        r=1,
        learning_rate=1e-2,
        max_steps=8,
        inner_max_steps=3,
        inner_check_every=2,
        outer_tol=1e-4,
        warmup_steps=1,
        rewarmup_steps=1,
    )
    trainer = AromaTrainer(loss_fn, model.params, cfg, stacked=hf.stacked_of(model), donate=False)
    names = {p.split("/")[-2] + "/" + p.split("/")[-1] for p in trainer.paths}
    assert {"encoder_attn/q_proj", "encoder_attn/out_proj", "self_attn/v_proj"} <= names
    assert len(trainer.paths) == 6 * 2 + 10 * 2  # encoder 6 per layer, decoder 10
    x, mask, y, dmask = inputs()
    labels = np.where(dmask == 1, np.roll(y, -1, axis=1), -100)
    batch = dict(
        input_ids=x,
        attention_mask=mask,
        decoder_input_ids=y,
        decoder_attention_mask=dmask,
        labels=labels,
    )
    state = trainer.init(model.params)
    losses = []
    for _ in range(8):
        state, info = trainer.step(state, batch)
        losses.append(float(info.loss))
    assert losses[-1] < losses[0]
    final = trainer.finalize(state)
    artifacts.save_final(tmp_path / "final", trainer, final)
    tensors, meta = artifacts.load_final(tmp_path / "final")
    model.save_pretrained(tmp_path / "merged", params=merged_params(model.params, tensors, meta))
    pt = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "merged").eval()
    with trainer.applied(final) as p:
        want = np.asarray(model(x, mask, y, dmask, params=p).logits)
    got = torch_logits(pt, x, mask, y, dmask)
    print(f"BART merged export: max |torch - native| {np.abs(got - want)[dmask == 1].max():.2e}")
    np.testing.assert_allclose(got[dmask == 1], want[dmask == 1], atol=1e-4)

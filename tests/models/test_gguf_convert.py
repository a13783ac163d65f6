"""The SmolLM2 asset's GGUF conversion (`aroma_jax.models.gguf_convert`) without Flax classes: a
tiny PyTorch LLaMA written as llama.cpp writes it (q/k rows permuted, F32 tensors, a GPT-2 BPE
tokenizer in the metadata), converted, then loaded by the native model and by PyTorch."""

import json

import numpy as np
import pytest

from aroma_jax.models import gguf_convert
from aroma_jax.models.native import NativeCausalLM

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

HEADS, KV_HEADS = 4, 2
CHARS = list("abcdefgh")
# byte-level BPE: the single characters, the space marker, one merge; then SmolLM2's specials
TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *CHARS, "\u0120", "ab"]


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (convert_hf_to_gguf.py), which `unpermute` undoes."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_gguf(model, path) -> None:
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(1e5)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(TOKENS)
    w.add_token_types([3, 3, 3] + [1] * (len(TOKENS) - 3))
    w.add_token_merges(["a b"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    names = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    for name, t in model.state_dict().items():
        a = t.detach().numpy().astype(np.float32)
        if name == "model.embed_tokens.weight":
            out = "token_embd.weight"
        elif name == "model.norm.weight":
            out = "output_norm.weight"
        elif name == "lm_head.weight":
            continue  # tied: llama.cpp writes no output.weight
        else:
            _, _, i, rest = name.split(".", 3)
            out = f"blk.{i}.{names[rest]}"
            if rest == "self_attn.q_proj.weight":
                a = permute(a, HEADS)
            elif rest == "self_attn.k_proj.weight":
                a = permute(a, KV_HEADS)
        w.add_tensor(out, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_llama_converts_to_a_checkpoint_native_and_pytorch_load(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(TOKENS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=64,
        rope_theta=1e5,
        tie_word_embeddings=True,
    )
    source = transformers.LlamaForCausalLM(cfg).eval()
    write_gguf(source, tmp_path / "m.gguf")
    out = gguf_convert.convert(tmp_path / "m.gguf", tmp_path / gguf_convert.CONVERTED)
    assert not (out / "flax_model.msgpack").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == 1e5 and config["tie_word_embeddings"] is True
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (HEADS, KV_HEADS)

    ids = np.array([[3, 4, 5, 9, 10, 11, 6], [7, 8, 3, 4, 12, 5, 6]], np.int64)
    mask = np.ones_like(ids)
    with torch.no_grad():
        want = source(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
        back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        got_pt = back(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    native = NativeCausalLM.from_pretrained(out)
    got = np.asarray(native(ids.astype(np.int32), attention_mask=mask.astype(np.int32)).logits)
    print(f"max |native - source| {np.abs(got - want).max():.1e}")
    np.testing.assert_allclose(got_pt, want, atol=1e-5)  # q/k rows un-permuted, tied head
    np.testing.assert_allclose(got, want, atol=1e-4)

    tok = transformers.AutoTokenizer.from_pretrained(out)  # what the runner loads
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert tok.convert_tokens_to_ids("ab") == TOKENS.index("ab")

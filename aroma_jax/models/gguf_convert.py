"""GGUF (llama.cpp) LLaMA checkpoints -> HF checkpoints, with numpy only (no torch, no Flax
model classes).

Used for the offline SmolLM2-135M-Instruct asset: every tensor is dequantised with the ``gguf``
package, llama.cpp's rotary permutation of the q/k rows is undone, GGUF names map to the LLaMA
tree of the native model (kernels transposed to ``(in, out)``), and the config and tokenizer
come from the GGUF metadata. The result is an HF checkpoint (``config.json``, a PyTorch-layout
``model.safetensors``, tokenizer files) that the native model and transformers' PyTorch
``LlamaForCausalLM`` load, on transformers 4.x and 5.x.

Example:
    >>> # convert("SmolLM2-135M-Instruct.Q4_1.gguf", "out/model")
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# The converted checkpoint's directory inside the asset; assets converted before the native
# models (an HF Flax ``flax_model.msgpack``) are in ``LEGACY_CONVERTED`` and still load.
CONVERTED = "model"
LEGACY_CONVERTED = "flax"

LAYER_MAP = {
    "attn_norm.weight": ("input_layernorm", "weight", False),
    "ffn_norm.weight": ("post_attention_layernorm", "weight", False),
    "attn_q.weight": ("self_attn/q_proj", "kernel", True),
    "attn_k.weight": ("self_attn/k_proj", "kernel", True),
    "attn_v.weight": ("self_attn/v_proj", "kernel", True),
    "attn_output.weight": ("self_attn/o_proj", "kernel", True),
    "ffn_gate.weight": ("mlp/gate_proj", "kernel", True),
    "ffn_up.weight": ("mlp/up_proj", "kernel", True),
    "ffn_down.weight": ("mlp/down_proj", "kernel", True),
}


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation (rotary halves interleaved) on ``(out, in)``."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key):
    field = reader.fields[key]
    value = field.parts[field.data[0]]
    return value.tobytes().decode() if value.dtype == np.uint8 else value.tolist()[0]


def read_config(reader) -> dict:
    """The HF ``config.json`` of a GGUF LLaMA, from its metadata (keys both transformers 4.x
    and 5.x read: ``rope_theta`` at the top level)."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported: accepted llama")
    g = lambda k: _field(reader, f"llama.{k}")  # noqa: E731
    names = {t.name for t in reader.tensors}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(g("vocab_size")),
        "hidden_size": int(g("embedding_length")),
        "intermediate_size": int(g("feed_forward_length")),
        "num_hidden_layers": int(g("block_count")),
        "num_attention_heads": int(g("attention.head_count")),
        "num_key_value_heads": int(g("attention.head_count_kv")),
        "max_position_embeddings": int(g("context_length")),
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(g("rope.freq_base")),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(_field(reader, "tokenizer.ggml.padding_token_id")),
    }


def read_params(reader, config: dict) -> dict:
    from gguf.quants import dequantize

    params: dict = {"model": {"layers": {}}}
    for t in reader.tensors:
        w = np.asarray(dequantize(t.data, t.tensor_type), np.float32)
        w = w.reshape(tuple(int(x) for x in reversed(t.shape)))  # GGUF lists dims innermost first
        if t.name == "token_embd.weight":
            params["model"]["embed_tokens"] = {"embedding": w}
        elif t.name == "output_norm.weight":
            params["model"]["norm"] = {"weight": w}
        elif t.name == "output.weight":
            params["lm_head"] = {"kernel": w.T}
        elif t.name.startswith("blk."):
            _, idx, rest = t.name.split(".", 2)
            module, leaf, transpose = LAYER_MAP[rest]
            if rest == "attn_q.weight":
                w = unpermute(w, config["num_attention_heads"])
            elif rest == "attn_k.weight":
                w = unpermute(w, config["num_key_value_heads"])
            node = params["model"]["layers"].setdefault(idx, {})
            for part in module.split("/"):
                node = node.setdefault(part, {})
            node[leaf] = np.ascontiguousarray(w.T if transpose else w)
        else:
            raise ValueError(f"unexpected GGUF tensor {t.name!r}")
    return params


def load_tokenizer(gguf_path: Path):
    """The HF fast tokenizer from the GGUF metadata; SmolLM2 chat: eos ``<|im_end|>``, no BOS."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    if "<|im_end|>" in tok.get_vocab():
        tok.eos_token = "<|im_end|>"
    if "<|endoftext|>" in tok.get_vocab():
        tok.pad_token = "<|endoftext|>"
    if hasattr(tok, "add_bos_token"):
        tok.add_bos_token = False
    return tok


def convert(gguf_path: str | Path, out_dir: str | Path) -> Path:
    import gguf

    from aroma_jax.models.native import checkpoint_io

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except Exception as err:  # numpy reshape/view errors on a cut-off file
        raise ValueError(
            f"{str(gguf_path)!r} is not a readable GGUF file (truncated or damaged?): {err}"
        ) from err
    config = read_config(reader)
    params = read_params(reader, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    checkpoint_io.save_safetensors(params, out_dir / "model.safetensors")
    load_tokenizer(gguf_path).save_pretrained(str(out_dir))
    return out_dir


def prepare_smollm2_asset(stage: Path, progress: bool = True) -> None:
    """`offline.fetch`'s prepare step for SmolLM2: its GGUF file becomes an HF checkpoint in
    ``stage / CONVERTED``."""
    ggufs = sorted(Path(stage).glob("*.gguf"))
    if not ggufs:
        raise RuntimeError(f"no .gguf file in {str(stage)!r}")
    if progress:
        print("  converting SmolLM2 GGUF -> HF checkpoint (safetensors) ...", flush=True)
    convert(ggufs[0], Path(stage) / CONVERTED)

"""The model shapes the lab scripts build from a config alone (random weights or abstract shapes,
nothing downloaded): one table for `bench`, `scale_sim`, `generate_speed` and `paper_plan`.

``SHAPES[name] = (architecture, config.json fields)``. The published models carry their hub
``config.json`` values (the fields that decide parameter shapes and token ids), so a plan or a
simulation of them matches the real checkpoint; the small shapes exist for CPU timings and tests.
"""

from __future__ import annotations

from typing import Any

Shape = tuple[str, dict[str, Any]]

SHAPES: dict[str, Shape] = {
    "roberta-base": (
        "roberta",
        dict(
            vocab_size=50265,
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            max_position_embeddings=514,
            type_vocab_size=1,
            layer_norm_eps=1e-5,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
        ),
    ),
    "bart-large": (
        "bart",
        dict(
            vocab_size=50265,
            d_model=1024,
            encoder_layers=12,
            decoder_layers=12,
            encoder_attention_heads=16,
            decoder_attention_heads=16,
            encoder_ffn_dim=4096,
            decoder_ffn_dim=4096,
            max_position_embeddings=1024,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
            forced_bos_token_id=0,
            forced_eos_token_id=2,
        ),
    ),
    "llama3-8b": (
        "llama",
        dict(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=8192,
            rope_theta=500000.0,
            rms_norm_eps=1e-5,
            bos_token_id=128000,
            eos_token_id=128001,
            tie_word_embeddings=False,
        ),
    ),
    # Gemma 3 4B's text stack (google/gemma-3-4b-pt text_config): 5 sliding layers (window
    # 1024, rotary base 1e4) per global one (base 1e6, linear scaling x8), tied embeddings.
    "gemma3-4b": (
        "gemma3_text",
        dict(
            model_type="gemma3_text",
            hidden_size=2560,
            intermediate_size=10240,
            num_hidden_layers=34,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=256,
            vocab_size=262208,
            query_pre_attn_scalar=256,
            sliding_window=1024,
            sliding_window_pattern=6,
            rope_theta=1_000_000.0,
            rope_local_base_freq=10_000.0,
            rope_scaling={"rope_type": "linear", "factor": 8.0},
            max_position_embeddings=131072,
            tie_word_embeddings=True,
        ),
    ),
    "qwen3-8b": (  # Qwen/Qwen3-8B: q/k norms, head_dim 128
        "qwen3",
        dict(
            model_type="qwen3",
            hidden_size=4096,
            intermediate_size=12288,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=151936,
            rope_theta=1_000_000.0,
            max_position_embeddings=40960,
        ),
    ),
    "llama3-70b": (
        "llama",
        dict(
            vocab_size=128256,
            hidden_size=8192,
            intermediate_size=28672,
            num_hidden_layers=80,
            num_attention_heads=64,
            num_key_value_heads=8,
            max_position_embeddings=8192,
            rope_theta=500000.0,
            rms_norm_eps=1e-5,
            bos_token_id=128000,
            eos_token_id=128001,
            tie_word_embeddings=False,
        ),
    ),
    # A LLaMA small enough to time and compile on a 2-core CPU.
    "llama-small": (
        "llama",
        dict(
            vocab_size=8000,
            hidden_size=512,
            intermediate_size=1536,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=4,
            max_position_embeddings=1024,
            tie_word_embeddings=False,
        ),
    ),
    # The demo's model (all-MiniLM-L6-v2: 6 layers, 384 wide) as a shape: random weights on the
    # RoBERTa code path (bench's --input-wait).
    "minilm": (
        "roberta",
        dict(
            vocab_size=30522,
            hidden_size=384,
            num_hidden_layers=6,
            num_attention_heads=12,
            intermediate_size=1536,
        ),
    ),
    # Test-sized stand-ins, one per architecture (`tiny` is the RoBERTa one).
    "tiny": (
        "roberta",
        dict(
            vocab_size=500,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=128,
        ),
    ),
    "tiny-llama": (
        "llama",
        dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=False,
        ),
    ),
    "tiny-bart": (
        "bart",
        dict(
            vocab_size=256,
            d_model=64,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=128,
            decoder_ffn_dim=128,
            max_position_embeddings=128,
        ),
    ),
}

# Hub names of the published shapes (what a run config's ``model.name`` says).
HUB_NAMES = {
    "roberta-base": "roberta-base",
    "facebook/bart-large": "bart-large",
    "meta-llama/Meta-Llama-3-8B": "llama3-8b",
}
# The test-sized stand-in of each architecture.
TINY = {"roberta": "tiny", "llama": "tiny-llama", "bart": "tiny-bart"}


def of_arch(*archs: str) -> list[str]:
    """The names of the shapes of these architectures, sorted (for a script's ``--model``)."""
    return sorted(name for name, (arch, _) in SHAPES.items() if arch in archs)

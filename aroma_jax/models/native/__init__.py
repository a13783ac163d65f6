"""JAX-native models in linen: the LLaMA family (LLaMA 2/3/3.1/3.2, Mistral, Qwen2/2.5) and
the BERT / RoBERTa sequence classifiers (`encoder_model`).

Read HF ``config.json`` and safetensors directly (no torch, no transformers model classes), keep
HF's Flax param paths so adapters inject unchanged, and attend through
``jax.nn.dot_product_attention``. See docs/MODELS.md.

Example:
    >>> # from aroma_jax.models.native import NativeCausalLM
    >>> # model = NativeCausalLM.from_pretrained("meta-llama/Llama-3.2-1B", param_dtype="bfloat16")
    >>> # scanned = NativeCausalLM.from_pretrained("meta-llama/Llama-3.2-1B", scan_layers=True)
"""

from aroma_jax.models.native.causal_lm import NativeCausalLM
from aroma_jax.models.native.config import NativeConfig, NativeConfigError
from aroma_jax.models.native.modeling import CausalLM, is_scanned, stack_layers, unstack_layers
from aroma_jax.models.native.wrapper import load_tokenizer

# Where the native models keep a layer stack (stacked under ``scan_layers``): LLaMA family,
# BERT, RoBERTa, BART encoder and decoder.
STACK_PATHS = (
    ("model", "layers"),
    ("bert", "encoder", "layer"),
    ("roberta", "encoder", "layer"),
    ("model", "encoder", "layers"),
    ("model", "decoder", "layers"),
)

__all__ = [
    "CausalLM",
    "NativeCausalLM",
    "NativeConfig",
    "NativeConfigError",
    "STACK_PATHS",
    "is_scanned",
    "load_tokenizer",
    "stack_layers",
    "unstack_layers",
]

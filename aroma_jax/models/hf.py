"""Loading models for a task (native BERT/RoBERTa, BART, LLaMA family; with ``model.impl: hf``
transformers 4.x's Flax classes), and their target presets.

``name`` may be an offline asset (``minilm``, ``smollm2``), a tiny random model built on the fly
(``tiny-bert``, ``tiny-roberta``, ``tiny-bart``, ``tiny-llama``: a word-level tokenizer trained
on the task's training text, seeded weights), a local directory or a hub name (for users who can
reach the hub). Native models read safetensors (or an HF Flax msgpack); the HF Flax classes use
Flax weights when present, else PyTorch/safetensors weights through ``from_pt=True``.

Presets follow the paper: RoBERTa/BERT adapt query, key, value, attention output, intermediate
and output (6 per layer); LLaMA q, k, v, up, down (o and gate available); BART q, k, v, out,
fc1, fc2 in every attention block of encoder and decoder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

PRESETS = {
    "bert": (
        "query",
        "key",
        "value",
        "attention/output/dense",
        "intermediate/dense",
        r".*layer/\d+/output/dense",
    ),
    "llama": ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj"),
    "bart": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
}
PRESETS["roberta"] = PRESETS["bert"]
LLAMA_ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# model_types the native models (`aroma_jax.models.native`) implement; ``model.impl: auto`` runs
# them natively (arch "llama": same presets and pipeline), everything else through HF Flax.
LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
ENCODER_FAMILY = ("bert", "roberta")  # `aroma_jax.models.native.encoder_model`
NATIVE_TYPES = (*LLAMA_FAMILY, *ENCODER_FAMILY, "bart")  # bart: `native.seq2seq_model`
IMPLS = ("auto", "native", "hf")


@dataclasses.dataclass
class Loaded:
    arch: str  # bert | roberta | bart | llama
    model: Any  # the HF Flax model object
    tokenizer: Any
    params: Any  # the params collection (HF layout, no "params" wrapper)
    # Layer stacks run under nn.scan: their path -> length (`AromaTrainer`'s ``stacked``).
    stacked: dict = dataclasses.field(default_factory=dict)


def preset_targets(arch: str) -> tuple[str, ...]:
    if arch not in PRESETS:
        raise ValueError(f"no target preset for architecture {arch!r}: accepted {sorted(PRESETS)}")
    return PRESETS[arch]


def head_patterns(arch: str, kind: str) -> tuple[str, ...]:
    """Task heads trained in full by default (PEFT's modules_to_save)."""
    if arch in ("bert", "roberta") and kind != "generation":
        return ("classifier",)
    return ()


def head_adapter_patterns(arch: str, kind: str) -> tuple[str, ...]:
    """The head's Dense layers that ``train.head: paper`` adapts instead of training the head.

    The authors' RoBERTa runs target the substring "dense", which also wraps
    ``classifier.dense``; ``classifier.out_proj`` stays frozen at its random init. BERT's head is
    one Dense (``classifier``), adapted the same way.
    """
    if kind == "generation":
        return ()
    if arch == "roberta":
        return ("classifier/dense",)
    if arch == "bert":
        return ("classifier",)
    return ()


def torch_module_name(arch: str, flax_path: str) -> str:
    """The PyTorch module name of a Flax module path (the HF layouts agree up to separators)."""
    del arch
    return flax_path.replace("/", ".")


# ---------------------------------------------------------------------------- tiny models
def simple_tokenizer(texts: list[str], vocab_size: int = 2000):
    """A word-level fast tokenizer trained on ``texts`` (offline, deterministic)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        sorted(texts),
        trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=specials, min_frequency=1),
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B:0 </s>:0",
        special_tokens=[("<s>", 1), ("</s>", 2)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        mask_token="<mask>",
        cls_token="<s>",
        sep_token="</s>",
    )


def _task_texts(task) -> list[str]:
    ds = task.splits["train"]
    texts = list(ds[task.text_field])
    if task.text_pair_field:
        texts += list(ds[task.text_pair_field])
    if task.kind == "generation":
        texts += list(ds[task.target_field])
    texts += ["Topic: Answer: Headline: Article:"] + [" ".join(task.label_names)]
    return texts


def hf_flax_available() -> bool:
    """Whether the installed transformers has its Flax model classes (4.x; 5.x removed them)."""
    try:
        import transformers as tf
    except ImportError:
        return False
    return hasattr(tf, "FlaxRobertaForSequenceClassification")


def require_hf_flax(name: str) -> None:
    """``model.impl: hf`` (and model types without a native implementation) need transformers
    4.x; on 5.x a one-line error says so instead of an AttributeError deep in transformers."""
    if hf_flax_available():
        return
    import transformers as tf

    raise ModelLoadError(
        f"{name!r} needs transformers' Flax classes (model.impl=hf), which transformers "
        f"{tf.__version__} does not have (5.x removed them): use model.impl=auto or native for "
        f"model types {', '.join(NATIVE_TYPES)}, or install transformers 4.x "
        "(pip install 'aroma-jax[hf4]')"
    )


def build_tiny(arch: str, task, num_labels: int | None, dtype, seed: int) -> Loaded:
    """``tiny-<arch>`` on transformers' Flax classes (``model.impl=hf``, transformers 4.x)."""
    import transformers as tf

    require_hf_flax(f"tiny-{arch}")

    tok = simple_tokenizer(_task_texts(task))
    common = dict(vocab_size=len(tok), pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch in ("roberta", "bert"):
        cls_cfg = tf.RobertaConfig if arch == "roberta" else tf.BertConfig
        cfg = cls_cfg(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=256,
            num_labels=num_labels or 2,
            **common,
        )
        cls = (
            tf.FlaxRobertaForSequenceClassification
            if arch == "roberta"
            else tf.FlaxBertForSequenceClassification
        )
    elif arch == "bart":
        cfg = tf.BartConfig(
            d_model=64,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=128,
            decoder_ffn_dim=128,
            max_position_embeddings=256,
            decoder_start_token_id=2,
            forced_eos_token_id=2,
            **common,
        )
        cls = tf.FlaxBartForConditionalGeneration
    elif arch == "llama":
        cfg = tf.LlamaConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            **common,
        )
        cls = llama_class()
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}: accepted bert, roberta, bart, llama")
    model = cls(cfg, seed=seed, dtype=dtype)
    return Loaded(arch, model, tok, model.params)


def _prepare_smollm2(stage: Path, progress: bool) -> None:
    from aroma_jax.models.gguf_convert import prepare_smollm2_asset

    prepare_smollm2_asset(stage, progress)


# Steps `aroma_jax.data.offline.fetch` runs on a freshly unpacked asset (pass as ``prepare=``).
ASSET_PREPARE = {"smollm2": _prepare_smollm2}


def llama_class():
    """The LLaMA causal-LM class with HF's Flax defects fixed (see `aroma_jax.models.llama`)."""
    from aroma_jax.models.llama import FixedFlaxLlamaForCausalLM

    return FixedFlaxLlamaForCausalLM


# ---------------------------------------------------------------------------- real models
MODEL_ASSETS = ("minilm", "smollm2")
TINY = ("tiny-bert", "tiny-roberta", "tiny-bart", "tiny-llama", "tiny-mistral", "tiny-qwen2")


class ModelLoadError(ValueError):
    """A model that cannot be loaded; the message says what was tried and what is accepted."""


def hub_status(name: str) -> str:
    """Whether the HF hub has ``name``, lacks it, or cannot be reached, as one phrase."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "not tried (HF_HUB_OFFLINE is set)"
    try:
        from huggingface_hub import model_info
        from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

        model_info(name, timeout=10)
    except HFValidationError:
        return f"not tried: {name!r} is not a hub repo id (accepted owner/name)"
    except RepositoryNotFoundError:
        return f"reachable, but it has no (public) model {name!r}"
    except Exception as err:  # requests/urllib3 raise many types when offline
        text = str(err).lower()
        if "resolve" in text or "name or service" in text:
            why = "cannot resolve huggingface.co"
        elif "timed out" in text or "timeout" in text:
            why = "timed out"
        else:
            why = type(err).__name__
        return f"unreachable ({why})"
    return f"has {name!r}, but loading it failed"


def require_on_hub(name: str) -> None:
    """A hub name must be on a reachable hub or in the local HF cache; else a `ModelLoadError`
    now, from one request, instead of the hub client's retries (about 25 s per file offline)."""
    status = hub_status(name)
    if status.startswith("has "):
        return
    if status.startswith(("unreachable", "not tried (HF_HUB_OFFLINE")):
        try:
            from huggingface_hub import try_to_load_from_cache

            if isinstance(try_to_load_from_cache(name, "config.json"), str):
                return  # cached: transformers loads it offline
        except Exception:  # not a valid repo id for the cache either
            pass
    raise ModelLoadError(_not_found(name, name, status))


def _not_found(name: str, path: str, status: str) -> str:
    return (
        f"model {name!r} not found. Tried, in order: (1) offline asset: not one of "
        f"{', '.join(MODEL_ASSETS)} (or a tiny random model: {', '.join(TINY)}); "
        f"(2) local directory: {str(Path(path).absolute())!r} does not exist; "
        f"(3) HF hub: {status}. Known assets: {', '.join(MODEL_ASSETS)} "
        "(`aroma-jax assets list`)"
    )


def _load_failure(name: str, path: str, what: str, err: BaseException) -> str:
    detail = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err) else ''}"
    if Path(path).exists():
        if what == "tokenizer":
            found = sorted(p.name for p in Path(path).iterdir()) if Path(path).is_dir() else []
            return (
                f"cannot load the tokenizer of model {name!r} from {str(path)!r} (files there: "
                f"{', '.join(found)}): accepted tokenizer.json, or tokenizer_config.json with its "
                "vocabulary files (vocab.txt, vocab.json + merges.txt or tokenizer.model)"
            )
        return (
            f"cannot load the {what} of model {name!r} from {str(path)!r}: {detail}; is a file "
            "missing or truncated? (re-copy or re-fetch it)"
        )
    return _not_found(name, path, hub_status(name))


@contextlib.contextmanager
def _loading(name: str, path: str, what: str = "weights"):
    """Turns any loader failure into a `ModelLoadError` that names what was tried.

    transformers, safetensors, msgpack and the hub client raise many unrelated types for a
    missing repo or a damaged file, so everything but our own errors is caught here.
    """
    try:
        yield
    except ModelLoadError:
        raise
    except Exception as err:
        raise ModelLoadError(_load_failure(name, path, what, err)) from err


def position_limit(loaded: Loaded) -> int | None:
    """The longest sequence the model's position embeddings cover (None: no stated limit).

    Out-of-range position ids do not fail under XLA (gathers clamp), so callers must check.
    RoBERTa numbers positions from ``pad_token_id + 1``, which costs it that many slots.
    """
    cfg = getattr(loaded.model, "config", None)
    limit = getattr(cfg, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return None
    if loaded.arch == "roberta":
        limit -= (getattr(cfg, "pad_token_id", None) or 0) + 1
    return limit


def resolve_path(name: str) -> str:
    """Asset names become their directories; anything else is passed to ``from_pretrained``."""
    from aroma_jax.data import offline

    if name == "minilm":
        return str(offline.asset_path("minilm"))
    if name == "smollm2":
        from aroma_jax.models.gguf_convert import CONVERTED, LEGACY_CONVERTED

        root = offline.asset_path("smollm2")
        for sub in (CONVERTED, LEGACY_CONVERTED):
            if (root / sub / "config.json").exists():
                return str(root / sub)
        raise FileNotFoundError(
            f"SmolLM2 has not been converted to an HF checkpoint in {str(root / CONVERTED)!r}: "
            "run `aroma-jax assets fetch smollm2` (it converts the GGUF file)"
        )
    return name


def load_for_task(
    name: str,
    task,
    num_labels: int | None = None,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    seed: int = 0,
    impl: str = "auto",
    scan_layers: bool | str = "auto",
    remat: str = "none",
) -> Loaded:
    """``impl``: ``auto`` (native for every model type in `NATIVE_TYPES`, HF Flax otherwise),
    ``native`` or ``hf`` (HF Flax: transformers 4.x; `require_hf_flax` explains on 5.x).

    ``scan_layers``: run a native model's layers under ``nn.scan`` (``auto``: yes; HF Flax
    models always unroll them). ``remat``: a native model's rematerialisation policy
    (``none``, ``full``, ``dots``); HF Flax models accept ``none`` only.
    """
    scan = scan_layers in (True, "auto")
    native_only = dict(scan_layers=scan, remat=remat)
    if name.startswith("tiny-"):
        arch = name[len("tiny-") :]
        if choose_impl(impl, arch if arch in NATIVE_TYPES else None, name) == "native":
            if arch in ENCODER_FAMILY:
                loaded = build_tiny_encoder(arch, task, num_labels, dtype, seed, **native_only)
            elif arch == "bart":
                loaded = build_tiny_bart(task, dtype, seed, **native_only)
            else:
                loaded = build_tiny_native(arch, task, dtype, seed, **native_only)
        else:
            _no_remat(remat, name)
            loaded = build_tiny(arch, task, num_labels or task.num_labels, dtype, seed)
    else:
        path = resolve_path(name)
        if not Path(path).exists():
            require_on_hub(name)
        with _loading(name, path, "config"):
            model_type = model_type_of(path)
        if choose_impl(impl, model_type, name) == "native":
            with _loading(name, path):
                if model_type in ENCODER_FAMILY:
                    model = load_native_encoder(
                        path, task, num_labels, dtype, param_dtype, seed, **native_only
                    )
                elif model_type == "bart":
                    model = load_native_bart(path, dtype, param_dtype, **native_only)
                else:
                    model = load_native_model(path, dtype, param_dtype, **native_only)
            with _loading(name, path, "tokenizer"):
                loaded = native_loaded(model)
        else:
            _no_remat(remat, name)
            loaded = _load_pretrained(path, task, num_labels, dtype, seed, name)
    if param_dtype != jnp.float32:
        loaded.params = jax.tree.map(lambda x: x.astype(param_dtype), loaded.params)
    return loaded


# ---------------------------------------------------------------------------- native models
def model_type_of(path: str) -> str | None:
    """``model_type`` from a local directory's or a hub repo's ``config.json`` (None: unknown)."""
    import json

    local = Path(path) / "config.json"
    if local.exists():
        return json.loads(local.read_text()).get("model_type")
    if Path(path).exists():
        return None
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(path, "config.json")).read_text()).get("model_type")
    except Exception:  # offline or not a hub repo: let the HF loader report it
        return None


def choose_impl(impl: str, model_type: str | None, name: str) -> str:
    """``native`` or ``hf`` for ``model.impl`` and the checkpoint's model_type."""
    if impl not in IMPLS:
        raise ValueError(f"invalid model.impl={impl!r}: accepted {IMPLS}")
    if impl == "auto":
        return "native" if model_type in NATIVE_TYPES else "hf"
    if impl == "native" and model_type not in NATIVE_TYPES:
        raise ValueError(
            f"model.impl=native runs model types {NATIVE_TYPES}; {name!r} is {model_type!r}: "
            "use model.impl=hf (or auto)"
        )
    return impl


def load_native(path: str, dtype=jnp.float32, param_dtype=jnp.float32) -> Loaded:
    """A LLaMA-family checkpoint (safetensors or HF Flax msgpack) on the native model."""
    return native_loaded(load_native_model(path, dtype, param_dtype))


def _no_remat(remat: str, name: str) -> None:
    if remat != "none":
        raise ValueError(
            f"model.remat={remat!r} needs a native model (LLaMA, Mistral, Qwen2 with "
            f"model.impl native or auto); {name!r} runs on HF Flax: accepted model.remat=none"
        )


def load_native_model(
    path: str,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    scan_layers: bool = False,
    remat: str = "none",
):
    from aroma_jax.models.native import NativeCausalLM

    return NativeCausalLM.from_pretrained(
        path, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers, remat=remat
    )


def stacked_of(model) -> dict:
    """``{"model/layers": L}`` (an encoder: ``{"bert/encoder/layer": L}``) for a native model
    that scans its layers, else ``{}``."""
    if not getattr(model, "scan_layers", False):
        return {}
    return {"/".join(at): n for at, n in model.layer_stacks}  # BART: two stacks


def native_loaded(model) -> Loaded:
    """A native model with its checkpoint's tokenizer."""
    from aroma_jax.models.native import load_tokenizer

    tok = load_tokenizer(model.source)
    arch = getattr(model.config, "model_type", "llama")
    arch = arch if arch in (*ENCODER_FAMILY, "bart") else "llama"
    return Loaded(arch, model, tok, model.params, stacked_of(model))


def load_native_encoder(
    path: str, task, num_labels, dtype, param_dtype, seed: int, scan_layers=False, remat="none"
):
    """A BERT / RoBERTa checkpoint as a native sequence classifier for ``task``."""
    from aroma_jax.models.native.encoder_model import NativeEncoder

    if task.kind == "generation":
        raise ValueError(f"{path!r} is an encoder; generation tasks need BART or LLaMA")
    return NativeEncoder.from_pretrained(
        path,
        num_labels=num_labels or task.num_labels,
        dtype=dtype,
        param_dtype=param_dtype,
        seed=seed,
        scan_layers=scan_layers,
        remat=remat,
    )


def load_native_bart(path: str, dtype, param_dtype, scan_layers=False, remat="none"):
    """A BART checkpoint on the native encoder-decoder."""
    from aroma_jax.models.native.seq2seq_model import NativeSeq2SeqLM

    return NativeSeq2SeqLM.from_pretrained(
        path, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers, remat=remat
    )


def build_tiny_bart(task, dtype, seed: int, scan_layers=False, remat="none") -> Loaded:
    """``tiny-bart`` on the native model (the shapes of `build_tiny`)."""
    from aroma_jax.models.native.bart import BartConfig
    from aroma_jax.models.native.seq2seq_model import NativeSeq2SeqLM

    tok = simple_tokenizer(_task_texts(task))
    cfg = BartConfig.from_dict(
        dict(
            model_type="bart",
            vocab_size=len(tok),
            d_model=64,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=128,
            decoder_ffn_dim=128,
            max_position_embeddings=256,
            decoder_start_token_id=2,
            forced_eos_token_id=2,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    )
    model = NativeSeq2SeqLM(cfg, dtype=dtype, seed=seed, scan_layers=scan_layers, remat=remat)
    return Loaded("bart", model, tok, model.params, stacked_of(model))


def build_tiny_encoder(
    arch: str, task, num_labels, dtype, seed: int, scan_layers=False, remat="none"
) -> Loaded:
    """``tiny-bert`` / ``tiny-roberta`` on the native encoder (the shapes of `build_tiny`)."""
    from aroma_jax.models.native.bert import EncoderConfig
    from aroma_jax.models.native.encoder_model import NativeEncoder

    tok = simple_tokenizer(_task_texts(task))
    cfg = EncoderConfig.from_dict(
        dict(
            model_type=arch,
            vocab_size=len(tok),
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=256,
            type_vocab_size=2,  # both HF configs' default, as in `build_tiny`
            num_labels=num_labels or task.num_labels or 2,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    )
    model = NativeEncoder(cfg, dtype=dtype, seed=seed, scan_layers=scan_layers, remat=remat)
    return Loaded(arch, model, tok, model.params, stacked_of(model))


def build_tiny_native(
    arch: str, task, dtype, seed: int, scan_layers: bool = False, remat: str = "none"
) -> Loaded:
    """``tiny-llama`` (and ``tiny-mistral``, ``tiny-qwen2``) on the native model."""
    from aroma_jax.models.native import NativeCausalLM, NativeConfig

    tok = simple_tokenizer(_task_texts(task))
    cfg = NativeConfig.from_dict(
        dict(
            model_type=arch,
            vocab_size=len(tok),
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    )
    model = NativeCausalLM(cfg, dtype=dtype, seed=seed, scan_layers=scan_layers, remat=remat)
    return Loaded("llama", model, tok, model.params, stacked_of(model))


def _load_pretrained(path: str, task, num_labels, dtype, seed, name: str = "") -> Loaded:
    import transformers as tf

    name = name or path
    require_hf_flax(name)
    with _loading(name, path, "config"):
        config = tf.AutoConfig.from_pretrained(path)
    arch = config.model_type
    local = Path(path)
    from_pt = local.is_dir() and not (local / "flax_model.msgpack").exists()
    kw = dict(dtype=dtype, from_pt=from_pt, seed=seed)
    if arch in ("bert", "roberta"):
        if task.kind == "generation":
            raise ValueError(
                f"{path!r} is an encoder ({arch}); generation tasks need BART or LLaMA"
            )
        with _loading(name, path):
            model = tf.FlaxAutoModelForSequenceClassification.from_pretrained(
                path, num_labels=num_labels or task.num_labels, **kw
            )
    elif arch in ("bart", "llama"):
        cls = tf.FlaxBartForConditionalGeneration if arch == "bart" else llama_class()
        with _loading(name, path):
            model = cls.from_pretrained(path, **kw)
    else:
        raise ValueError(
            f"unsupported model type {arch!r} in {path!r}: accepted bert, roberta, bart, llama"
        )
    with _loading(name, path, "tokenizer"):
        tok = tf.AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return Loaded(arch, model, tok, model.params)

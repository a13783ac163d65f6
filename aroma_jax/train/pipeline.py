"""From a run config to (model params, loss, batches, evaluation): the task/model glue.

`build_pipeline` loads the model (`aroma_jax.models`) and the task (`aroma_jax.data`),
tokenizes every split into fixed-shape numpy arrays (one compile), picks the objective for the
(task kind, architecture) pair and knows how to evaluate:

* classification / regression / sentence pairs on an encoder: logits -> accuracy, F1, MCC or
  Pearson/Spearman;
* generation on an encoder-decoder (BART): teacher-forced loss, greedy generation -> ROUGE;
* a decoder-only LM (LLaMA): classification tasks become text ("... Topic: business"),
  evaluated by multiple-choice scoring of every label's log-likelihood; generation tasks are
  trained on the target tokens and evaluated by greedy generation -> ROUGE;
* instruction tasks (commonsense170k) on a decoder-only LM: LLM-Adapters' protocol, greedy
  generation -> answer extraction -> per-set accuracy and their average.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from aroma_jax.core import sharding
from aroma_jax.core.config import AromaConfig
from aroma_jax.data import objectives, stream
from aroma_jax.data import scores as metrics_lib
from aroma_jax.data import tasks as data
from aroma_jax.models import hf as models
from aroma_jax.train import generation, run_config
from aroma_jax.train.run_config import RunConfig, TaskConfig


@dataclasses.dataclass
class Pipeline:
    arch: str
    kind: str  # the task kind
    model: Any
    tokenizer: Any
    params: Any
    aroma: AromaConfig
    loss_fn: Callable
    train_arrays: Mapping[str, Any]  # field -> array, or a `stream.StreamedSplit`
    eval_examples: dict[str, Any]  # split -> encoded eval data
    evaluator: Callable  # (pipeline, trainer, state, split, batch_size) -> metrics dict
    stacked: dict = dataclasses.field(default_factory=dict)  # scanned layer stacks: path -> L
    task: Any = None  # the `data.Task` (its kind, class names)
    # what loss_fn averages over (target tokens), so accumulated micro-batches weigh by it;
    # None: an example mean
    loss_weight: Callable | None = None

    def evaluate(self, trainer, state, split: str, batch_size: int) -> dict:
        return self.evaluator(self, trainer, state, split, batch_size)


def _dtype(name: str):
    return jnp.bfloat16 if name == "bfloat16" else jnp.float32


def build_pipeline(cfg: RunConfig) -> Pipeline:
    """The run's model, task and objective; its `AromaConfig` from the method and optimizer
    sections, completed by the architecture's preset targets and head (`aroma_for`)."""
    tcfg, mcfg = cfg.task, cfg.model
    task = data.get_task(tcfg.name, seed=cfg.train.seed, **_task_kwargs(tcfg))
    task = data.limit(task, tcfg.max_train_examples, tcfg.max_eval_examples)
    data.check_learnable(task)
    loaded = models.load_for_task(
        mcfg.name,
        task,
        num_labels=mcfg.num_labels,
        dtype=_dtype(mcfg.dtype),
        param_dtype=_dtype(mcfg.param_dtype),
        seed=cfg.train.seed,
        impl=mcfg.impl,
        scan_layers=mcfg.scan_layers,
        remat=mcfg.remat,
    )
    check_lengths(cfg, loaded)
    check_labels(cfg, task)
    aroma = aroma_for(cfg, loaded.arch, task.kind)
    if task.kind == "instruction":
        if loaded.arch != "llama":
            raise ValueError(
                f"task {task.name!r} is answered by generation from a decoder-only LM; "
                f"{mcfg.name!r} is a {loaded.arch} model: accepted a LLaMA model"
            )
        return _instruction_pipeline(cfg, task, loaded, aroma)
    if loaded.arch == "llama":
        return _causal_lm_pipeline(cfg, task, loaded, aroma)
    if loaded.arch == "bart":
        return _seq2seq_pipeline(cfg, task, loaded, aroma)
    return _encoder_pipeline(cfg, task, loaded, aroma)


def class_names(pipe: Pipeline) -> tuple[str, ...]:
    """The class names of a classification run, in id order (() for other tasks)."""
    task = pipe.task
    if task is None or task.kind not in ("classification", "pair_classification"):
        return ()
    return tuple(task.label_names)


def with_label_names(cfg: RunConfig, pipe: Pipeline) -> RunConfig:
    """``cfg`` with the class order a run mapped its text labels by (``task.label_names``), so
    the run directory's config.yaml keeps the mapping and eval, export and resume use it."""
    if cfg.task.label_names is None and pipe.task is not None and pipe.task.text_labels:
        names = tuple(pipe.task.label_names)
        return cfg.replace(task=dataclasses.replace(cfg.task, label_names=names))
    return cfg


def check_lengths(cfg: RunConfig, loaded: models.Loaded) -> None:
    """Sequence lengths within the model's position limit, before anything is tokenized.

    Past the limit XLA clamps position ids (silently wrong) and attention memory grows as the
    length squared, so a typo such as ``task.max_len=100000`` must stop here.
    """
    limit = models.position_limit(loaded)
    if limit is None:
        return
    tcfg, name = cfg.task, cfg.model.name
    lengths = {"task.max_len": tcfg.max_len}
    if loaded.arch == "bart":
        lengths["task.target_max_len"] = tcfg.target_max_len
        lengths["train.generate_max_len"] = cfg.train.generate_max_len
    for key, value in lengths.items():
        if value > limit:
            raise ValueError(
                f"{key}={value} is above the position limit of model {name!r} ({limit} tokens): "
                f"accepted 1..{limit}"
            )


def check_labels(cfg: RunConfig, task: data.Task) -> None:
    """``model.num_labels`` must cover every label id of every split (XLA would not notice an
    out-of-range class id: losses and metrics would silently be wrong)."""
    n = cfg.model.num_labels
    if n is None or task.kind not in ("classification", "pair_classification"):
        return
    for split, ds in task.splits.items():
        labels = np.asarray(ds[task.label_field])
        bad = np.nonzero((labels < 0) | (labels >= n))[0]
        if len(bad):
            raise ValueError(
                f"model.num_labels={n} but task {task.name!r} split {split!r} row "
                f"{int(bad[0]) + 1} has label {labels[bad[0]]}: accepted model.num_labels >= "
                f"{task.num_labels} (or null: the task's own count)"
            )


def aroma_for(cfg: RunConfig, arch: str, kind: str) -> AromaConfig:
    """The run's `AromaConfig` for a model architecture and task kind (targets, head)."""
    return run_config.method_config(
        cfg,
        models.preset_targets(arch),
        models.head_patterns(arch, kind),
        models.head_adapter_patterns(arch, kind),
    )


def _make(loaded, task, aroma, loss_fn, train, evals, evaluator, loss_weight=None) -> Pipeline:
    return Pipeline(
        loaded.arch,
        task.kind,
        loaded.model,
        loaded.tokenizer,
        loaded.params,
        aroma,
        loss_fn,
        train,
        evals,
        evaluator,
        stacked=dict(loaded.stacked),
        task=task,
        loss_weight=loss_weight,
    )


def _task_kwargs(tcfg: TaskConfig) -> dict:
    keys = ("text_field", "text_pair_field", "label_field", "source", "eval_source", "bad_rows")
    out = {k: getattr(tcfg, k) for k in keys if getattr(tcfg, k) is not None}
    if tcfg.label_names is not None:
        out["label_names"] = list(tcfg.label_names)
    if tcfg.dev_examples:
        out["dev_examples"] = tcfg.dev_examples
    return out


def _streams(cfg: RunConfig, task: data.Task) -> bool:
    """Whether the training split is tokenized on demand (``task.streaming``)."""
    return stream.wanted(cfg.task.streaming, len(task.splits["train"]))


def _train_split(cfg: RunConfig, task: data.Task, encode: Callable) -> Mapping[str, Any]:
    """The training split for `batch_at`: ``encode(rows)`` of the whole split now, or a
    `stream.StreamedSplit` that encodes each batch's rows when grain gathers them."""
    rows = task.splits["train"]
    return stream.StreamedSplit(rows, encode) if _streams(cfg, task) else encode(rows)


def _eval_splits(cfg: RunConfig, task: data.Task) -> list[str]:
    """The splits tokenized up front for evaluation (a streamed training split is not)."""
    return [s for s in task.splits if not (s == "train" and _streams(cfg, task))]


def _on(task: data.Task, rows) -> data.Task:
    """``task`` whose training split is ``rows`` (to run a split encoder on some rows)."""
    return dataclasses.replace(task, splits={**task.splits, "train": rows})


# ----------------------------------------------------------------------------- encoders
def _encoder_pipeline(cfg, task, loaded, aroma) -> Pipeline:
    regression = task.kind == "regression"
    loss_fn, predict_fn = objectives.classification(loaded.model, regression=regression)
    max_len = cfg.task.max_len
    tok = loaded.tokenizer
    enc = {s: data.encode_classification(task, tok, s, max_len) for s in _eval_splits(cfg, task)}
    enc["train"] = _train_split(
        cfg, task, lambda rows: data.encode_classification(_on(task, rows), tok, "train", max_len)
    )
    predict = _with_adapters(predict_fn)

    def evaluator(pipe, trainer, state, split, batch_size):
        arrays = pipe.eval_examples[split]
        preds = _batched(lambda b: predict(trainer, state, b), arrays, batch_size)
        return metrics_lib.compute(task.metrics, preds, arrays["labels"])

    return _make(loaded, task, aroma, loss_fn, enc["train"], enc, evaluator)


def _with_adapters(fn: Callable) -> Callable:
    """``fn(params, batch)`` -> ``g(trainer, state, batch)`` running with the state's adapters.

    ``trainer`` is static (hashable by identity) so the jitted ``g`` compiles once per trainer.
    """

    def g(trainer, state, batch):
        with trainer.applied(state) as params:
            return fn(params, batch)

    return _StaticFirst(g)


class _StaticFirst:
    """Makes the first argument static for ``jax.jit`` (trainer objects are not pytrees)."""

    def __init__(self, fn):
        self.fn = fn
        self._jitted = jax.jit(fn, static_argnums=0)

    def __call__(self, trainer, state, batch):
        return self._jitted(trainer, state, batch)


def _batched(fn: Callable, arrays: Mapping[str, np.ndarray], batch_size: int) -> np.ndarray:
    """Runs ``fn`` over fixed-size batches (the last one padded), concatenating the outputs."""
    n = len(next(iter(arrays.values())))
    outs = []
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size) % n  # pad by wrapping: shapes stay fixed
        # to_host: outputs sharded over several processes are gathered, so every process
        # scores the whole split exactly as one process would.
        out = sharding.to_host(fn({k: v[idx] for k, v in arrays.items()}))
        outs.append(np.asarray(out)[: min(batch_size, n - start)])
    return np.concatenate(outs) if outs else np.zeros((0,))


# ---------------------------------------------------------------------------- seq2seq
def _seq2seq_pipeline(cfg, task, loaded, aroma) -> Pipeline:
    loss_fn, _ = objectives.seq2seq(loaded.model)
    tcfg = cfg.task
    start_id = loaded.model.config.decoder_start_token_id

    def encode(t: data.Task, s: str) -> dict[str, np.ndarray]:
        return data.encode_seq2seq(
            t, loaded.tokenizer, s, tcfg.max_len, tcfg.target_max_len, start_id
        )

    enc = {s: encode(task, s) for s in _eval_splits(cfg, task)}
    enc["train"] = _train_split(cfg, task, lambda rows: encode(_on(task, rows), "train"))
    search = generation.search_kwargs(cfg.train, native=hasattr(loaded.model, "search_settings"))

    def gen_fn(params, batch):
        return loaded.model.generate(
            batch["input_ids"], attention_mask=batch["attention_mask"], params=params, **search
        ).sequences

    generate = _with_adapters(gen_fn)

    def evaluator(pipe, trainer, state, split, batch_size):
        arrays = pipe.eval_examples[split]
        inputs = {k: arrays[k] for k in ("input_ids", "attention_mask")}
        seqs = _batched(lambda b: generate(trainer, state, b), inputs, batch_size)
        preds = loaded.tokenizer.batch_decode(seqs, skip_special_tokens=True)
        refs = list(task.splits[split][task.target_field])
        return metrics_lib.compute(task.metrics, preds, refs)

    return _make(
        loaded, task, aroma, loss_fn, enc["train"], enc, evaluator, objectives.seq2seq_tokens
    )


# ---------------------------------------------------------------------------- causal LM
def _causal_lm_pipeline(cfg, task, loaded, aroma) -> Pipeline:
    loss_fn, score_fn = objectives.causal_lm(loaded.model)
    max_len = cfg.task.max_len
    tok = loaded.tokenizer
    train = _train_split(
        cfg, task, lambda rows: data.encode_causal_lm(_on(task, rows), tok, "train", max_len)
    )
    score = _with_adapters(score_fn)

    if task.kind in ("generation",):
        gen_len = cfg.train.generate_max_len

        def gen_fn(params, batch):
            return loaded.model.generate(
                batch["input_ids"],
                attention_mask=batch["attention_mask"],
                params=params,
                max_new_tokens=gen_len,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            ).sequences

        generate = _with_adapters(gen_fn)
        prompts = {s: data.encode_prompts(task, tok, s, max_len) for s in _eval_splits(cfg, task)}

        def evaluator(pipe, trainer, state, split, batch_size):
            arrays = prompts[split]
            seqs = _batched(lambda b: generate(trainer, state, b), arrays, batch_size)
            preds = tok.batch_decode(
                seqs[:, arrays["input_ids"].shape[1] :], skip_special_tokens=True
            )
            preds = [p.strip().split("\n")[0] for p in preds]
            refs = list(task.splits[split][task.target_field])
            return metrics_lib.compute(task.metrics, preds, refs)

        return _make(
            loaded, task, aroma, loss_fn, train, prompts, evaluator, objectives.causal_lm_tokens
        )

    # Classification as text: score every label's continuation, predict the best.
    choices = {s: data.encode_choices(task, tok, s, max_len) for s in _eval_splits(cfg, task)}

    def evaluator(pipe, trainer, state, split, batch_size):
        arrays, labels, n_choices = choices[split]
        scores = _batched(lambda b: score(trainer, state, b), arrays, batch_size)
        preds = np.argmax(scores.reshape(-1, n_choices), axis=-1)
        return metrics_lib.compute(["mc_accuracy"], preds, labels)

    return _make(
        loaded, task, aroma, loss_fn, train, choices, evaluator, objectives.causal_lm_tokens
    )


# -------------------------------------------------------- instructions (commonsense170k)
def _instruction_pipeline(cfg, task, loaded, aroma) -> Pipeline:
    """LLM-Adapters' protocol: train on prompt -> response, evaluate by greedy generation of
    ``train.generate_max_len`` new tokens, answer extraction and per-set accuracy."""
    from aroma_jax.data import commonsense

    loss_fn, _ = objectives.causal_lm(loaded.model)
    max_len, tok = cfg.task.max_len, loaded.tokenizer
    train = _train_split(cfg, task, lambda rows: commonsense.encode_train(rows, tok, max_len))
    new_tokens = cfg.train.generate_max_len

    def gen_fn(params, batch):
        return loaded.model.generate(
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            params=params,
            max_new_tokens=new_tokens,
            num_beams=1,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        ).sequences

    generate = _with_adapters(gen_fn)
    prompts = {
        s: commonsense.encode_prompts(task.splits[s], tok, max_len) for s in ("validation", "test")
    }

    def evaluator(pipe, trainer, state, split, batch_size):
        arrays = prompts[split]
        seqs = _batched(lambda b: generate(trainer, state, b), arrays, batch_size)
        responses = tok.batch_decode(
            seqs[:, arrays["input_ids"].shape[1] :], skip_special_tokens=True
        )
        return commonsense.score(task.splits[split], responses)

    return _make(
        loaded, task, aroma, loss_fn, train, prompts, evaluator, objectives.causal_lm_tokens
    )

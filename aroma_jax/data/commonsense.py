"""Commonsense reasoning as in LLM-Adapters (Hu et al. 2023), the source of the paper's table 3.

Training data: Commonsense170K, rows ``{instruction, input, output, answer}`` with ``output``
``"the correct answer is <answer>"`` (hub ``zwhe99/commonsense_170k``, or LLM-Adapters'
``ft-training_set/commonsense_170k.json`` as a local file). Every row is put in the Alpaca
template LLM-Adapters uses (`prompt`), and the loss covers the response tokens.

Evaluation: the eight sets below, each asked as an instruction, answered by greedy generation
(LLM-Adapters generates up to 32 new tokens), the answer word pulled out of the response
(`extract_answer`, LLM-Adapters' ``extract_answer``: the first match of the set's answer words)
and compared with the gold answer. We report per-set accuracy and their mean (table 3's Avg).

An evaluation set comes from, in this order: ``<eval_source>/<NAME>/test.json`` in
LLM-Adapters' layout (rows already in the instruction format), ``<eval_source>/<NAME>/`` holding
the hub dataset's files in the hub schema, or the hub itself (``eval_source`` null). Hub rows are
turned into instructions with LLM-Adapters' wording for that set (`to_instruction`).

Example:
    >>> row = {"question": "is the sky blue", "answer": True, "passage": "..."}
    >>> to_instruction("boolq", row)["instruction"]
    'Please answer the following question with true or false, question: is the sky blue?\\n\\nAnswer format: true/false'
    >>> extract_answer("boolq", "the correct answer is false")
    'false'
"""  # noqa: E501

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import datasets
import numpy as np

from aroma_jax.data.base import DataError, Task
from aroma_jax.data.sources import is_local, load_splits, seeded_holdout

TRAIN_HUB = "zwhe99/commonsense_170k"
COLUMNS = ("instruction", "input", "output", "answer")

# LLM-Adapters' Alpaca template (commonsense_evaluate.py ``generate_prompt``), whitespace
# included: its evaluation prompts carry a 16-space indent, and the model is scored on them.
_INDENT = " " * 16
TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request. \n\n"
    + _INDENT
    + "### Instruction:\n"
    + _INDENT
    + "{instruction}\n\n"
    + _INDENT
    + "### Response:\n"
    + _INDENT
)
TEMPLATE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    + _INDENT + "### Instruction:\n" + _INDENT + "{instruction}\n\n"
    + _INDENT + "### Input:\n" + _INDENT + "{input}\n\n"
    + _INDENT + "### Response:\n" + _INDENT
)  # fmt: skip


class EvalSet(NamedTuple):
    hub: str
    config: str | None
    split: str  # the split LLM-Adapters' test.json was built from
    answers: tuple[str, ...]  # the answer words `extract_answer` looks for


_ANSWER5 = tuple(f"answer{i}" for i in range(1, 6))
EVAL_SETS: dict[str, EvalSet] = {  # LLM-Adapters' set names and order
    "boolq": EvalSet("google/boolq", None, "validation", ("true", "false")),
    "piqa": EvalSet("ybisk/piqa", None, "validation", ("solution1", "solution2")),
    "social_i_qa": EvalSet("allenai/social_i_qa", None, "validation", _ANSWER5),
    "hellaswag": EvalSet("Rowan/hellaswag", None, "validation", ("ending1", "ending2", "ending3", "ending4")),  # noqa: E501
    "winogrande": EvalSet("allenai/winogrande", "winogrande_xl", "validation", ("option1", "option2")),  # noqa: E501
    "ARC-Easy": EvalSet("allenai/ai2_arc", "ARC-Easy", "test", _ANSWER5),
    "ARC-Challenge": EvalSet("allenai/ai2_arc", "ARC-Challenge", "test", _ANSWER5),
    "openbookqa": EvalSet("allenai/openbookqa", "main", "test", _ANSWER5),
}  # fmt: skip


def prompt(instruction: str, input: str = "") -> str:
    """The model's input for one instruction (LLM-Adapters' template)."""
    if input:
        return TEMPLATE_WITH_INPUT.format(instruction=instruction, input=input)
    return TEMPLATE.format(instruction=instruction)


def extract_answer(name: str, text: str) -> str:
    """The first of the set's answer words in ``text`` (case-sensitive), or ``""`` if none."""
    if name not in EVAL_SETS:
        raise DataError(f"unknown commonsense set {name!r}: accepted {', '.join(EVAL_SETS)}")
    found = re.findall("|".join(EVAL_SETS[name].answers), text.strip())
    return found[0] if found else ""


# ----------------------------------------------------------- hub schema -> instruction
def _choices(question: str, word: str, options: Sequence[str], sep: str = " ") -> str:
    listed = sep.join(f"{word.capitalize()}{i}: {o}" for i, o in enumerate(options, 1))
    fmt = "/".join(f"{word}{i}" for i in range(1, len(options) + 1))
    return f"{question}\n\n{listed}\n\nAnswer format: {fmt}"


def _keyed(row: dict, question: str) -> tuple[str, str]:
    labels, texts = row["choices"]["label"], row["choices"]["text"]
    if row["answerKey"] not in labels:
        raise DataError(f"answerKey {row['answerKey']!r} is not one of the choice labels {labels}")
    ask = f"Please choose the correct answer to the question: {question}"
    body = _choices(ask, "answer", texts)
    return body, f"answer{labels.index(row['answerKey']) + 1}"


_CONVERT: dict[str, Callable[[dict], tuple[str, str]]] = {
    "boolq": lambda r: (
        "Please answer the following question with true or false, question: "
        f"{r['question']}?\n\nAnswer format: true/false",
        "true" if r["answer"] else "false",
    ),
    "piqa": lambda r: (
        _choices(
            f"Please choose the correct solution to the question: {r['goal']}",
            "solution",
            [r["sol1"], r["sol2"]],
            sep="\n\n",
        ),
        f"solution{int(r['label']) + 1}",
    ),
    "social_i_qa": lambda r: (
        _choices(
            f"Please choose the correct answer to the question: {r['context']} {r['question']}",
            "answer",
            [r["answerA"], r["answerB"], r["answerC"]],
        ),
        f"answer{int(r['label'])}",
    ),
    "hellaswag": lambda r: (
        _choices(
            "Please choose the correct ending to complete the given sentence: "
            f"{r['activity_label']}: {r['ctx']}",
            "ending",
            r["endings"],
        ),
        f"ending{int(r['label']) + 1}",
    ),
    # WinoGrande's options and answer format share one line in LLM-Adapters' files.
    "winogrande": lambda r: (
        "Please choose the correct answer to fill in the blank to complete the given sentence: "
        f"{r['sentence']}\n\nOption1: {r['option1']} Option2: {r['option2']} "
        "Answer format: option1/option2",
        f"option{int(r['answer'])}",
    ),
    "ARC-Easy": lambda r: _keyed(r, r["question"]),
    "ARC-Challenge": lambda r: _keyed(r, r["question"]),
    "openbookqa": lambda r: _keyed(r, r["question_stem"]),
}


def to_instruction(name: str, row: dict[str, Any]) -> dict[str, str]:
    """One hub row of set ``name`` as an LLM-Adapters row (instruction, input, output, answer)."""
    if name not in _CONVERT:
        raise DataError(f"unknown commonsense set {name!r}: accepted {', '.join(EVAL_SETS)}")
    try:
        instruction, answer = _CONVERT[name](row)
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(
            f"{name} row {row!r} is not in the {EVAL_SETS[name].hub} schema ({err!r})"
        ) from err
    return {
        "instruction": instruction,
        "input": "",
        "output": f"the correct answer is {answer}",
        "answer": answer,
    }


# ------------------------------------------------------------------------- loading
def _check_format(ds: datasets.Dataset, where: str) -> None:
    missing = [c for c in ("instruction", "answer") if c not in ds.column_names]
    if missing:
        raise DataError(
            f"{where} has no column(s) {missing}; it has {ds.column_names} (expected LLM-Adapters' "
            "instruction, input, output, answer)"
        )


def _in_format(r: dict) -> dict:
    answer = str(r["answer"])
    return {
        "instruction": r["instruction"],
        "input": r.get("input") or "",
        "output": r.get("output") or f"the correct answer is {answer}",
        "answer": answer,
    }


def _rows_in_format(ds: datasets.Dataset, where: str) -> list[dict]:
    _check_format(ds, where)
    return [_in_format(r) for r in ds]


def load_eval_set(name: str, eval_source: str | None = None) -> list[dict]:
    """One evaluation set as LLM-Adapters rows (see the module docstring for the lookup order)."""
    spec = EVAL_SETS[name]
    if eval_source is not None:
        root = Path(eval_source).expanduser() / name
        if (root / "test.json").is_file():
            rows = json.loads((root / "test.json").read_text())
            return _rows_in_format(datasets.Dataset.from_list(rows), str(root / "test.json"))
        if not root.is_dir():
            raise DataError(
                f"commonsense set {name!r}: neither {str(root / 'test.json')!r} (LLM-Adapters "
                f"layout) nor a directory {str(root)!r} with {spec.hub} files exists"
            )
        ds = load_splits(str(root), spec.config, (spec.split,))[spec.split]
    else:
        ds = load_splits(spec.hub, spec.config, (spec.split,))[spec.split]
    return [to_instruction(name, dict(r)) for r in ds]


def _train_rows(source: str | None) -> datasets.Dataset:
    if source is not None and Path(source).expanduser().is_file():
        ds = datasets.load_dataset("json", data_files=str(Path(source).expanduser()), split="train")
    elif source is None or not is_local(source) or Path(source).is_dir():
        ds = load_splits(source or TRAIN_HUB, None, ("train",))["train"]
    else:
        raise DataError(f"Commonsense170K source {source!r}: accepted a hub name, a file or a dir")
    _check_format(ds, f"Commonsense170K from {source or TRAIN_HUB!r}")
    # Arrow to Arrow: a file or hub copy stays memory-mapped from the datasets cache, so the
    # 170K rows are not held in the Python heap (`aroma_jax.data.stream` reads them per batch)
    return ds.map(_in_format, remove_columns=ds.column_names, desc="Commonsense170K rows")


def parse_sets(spec: str | None) -> tuple[str, ...]:
    """``None``/``""`` -> all eight; else a comma-separated subset of `EVAL_SETS` names."""
    if not spec:
        return tuple(EVAL_SETS)
    names = tuple(s.strip() for s in spec.split(",") if s.strip())
    bad = [n for n in names if n not in EVAL_SETS]
    if bad:
        raise DataError(f"unknown commonsense set(s) {bad}: accepted {', '.join(EVAL_SETS)}")
    return names


def commonsense(
    sets: str | None = None,
    seed: int = 0,
    source: str | None = None,
    eval_source: str | None = None,
    dev_examples: int = 0,
) -> Task:
    """Commonsense170K for training; the chosen evaluation sets, concatenated with a ``set``
    column, as the test split. ``validation`` is a seeded hold-out of ``dev_examples`` training
    rows when > 0 (the generation evaluation run during training), else the test split."""
    names = parse_sets(sets)
    train = _train_rows(source)
    if isinstance(dev_examples, bool) or not isinstance(dev_examples, int) or dev_examples < 0:
        raise DataError(f"invalid task.dev_examples={dev_examples!r}: accepted an integer >= 0")
    rows = [{**r, "set": n} for n in names for r in load_eval_set(n, eval_source)]
    test = datasets.Dataset.from_list(rows)
    dev = test
    if dev_examples:
        train, held = seeded_holdout(train, dev_examples, seed)
        dev = held.map(lambda r: {"set": _set_of(r["answer"])})
    return Task(
        "commonsense170k" + (f"/{sets}" if sets else ""),
        "instruction",
        0,
        {"train": train, "validation": dev, "test": test},
        text_field="instruction",
        label_field="answer",
        target_field="output",
        metrics=("accuracy",),
    )


def _set_of(answer: str) -> str:
    """A training row's answer words name a set whose extraction rule fits it (for dev scoring)."""
    for name, spec in EVAL_SETS.items():
        if answer in spec.answers:
            return name
    raise DataError(f"training answer {answer!r} is none of the eight sets' answer words")


# ------------------------------------------------------------------------ encoding
def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _bos(tok) -> list[int]:
    # LLM-Adapters tokenizes with the tokenizer's defaults: LLaMA's adds BOS and no EOS.
    return [tok.bos_token_id] if tok.bos_token_id is not None else []


def encode_train(ds: datasets.Dataset, tok, max_len: int) -> dict[str, np.ndarray]:
    """BOS + prompt + response + EOS, cut at ``max_len`` (LLM-Adapters' cutoff_len), right-padded;
    ``loss_mask`` marks the response and EOS."""
    n = len(ds)
    ids = np.full((n, max_len), tok.pad_token_id or 0, np.int32)
    att = np.zeros((n, max_len), np.int32)
    mask = np.zeros((n, max_len), np.int32)
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    for i, r in enumerate(ds):
        p = _bos(tok) + _ids(tok, prompt(r["instruction"], r.get("input") or ""))
        seq = (p + _ids(tok, r["output"]) + eos)[:max_len]
        ids[i, : len(seq)] = seq
        att[i, : len(seq)] = 1
        mask[i, min(len(p), len(seq)) : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": att, "loss_mask": mask}


def encode_prompts(ds: datasets.Dataset, tok, max_len: int) -> dict[str, np.ndarray]:
    """Left-padded prompts for generation (the start of a too-long prompt is cut, BOS kept)."""
    n = len(ds)
    ids = np.full((n, max_len), tok.pad_token_id or 0, np.int32)
    att = np.zeros((n, max_len), np.int32)
    for i, r in enumerate(ds):
        body = _ids(tok, prompt(r["instruction"], r.get("input") or ""))
        p = _bos(tok) + body[-(max_len - len(_bos(tok))) :]
        ids[i, max_len - len(p) :] = p
        att[i, max_len - len(p) :] = 1
    return {"input_ids": ids, "attention_mask": att}


def score(ds: datasets.Dataset, responses: Sequence[str]) -> dict[str, float]:
    """Per-set accuracy of generated ``responses`` and their unweighted mean (``average``)."""
    sets, gold = list(ds["set"]), list(ds["answer"])
    if len(responses) != len(gold):
        raise DataError(f"{len(responses)} responses for {len(gold)} examples")
    hits: dict[str, list[bool]] = {}
    for name, answer, text in zip(sets, gold, responses, strict=True):
        hits.setdefault(name, []).append(extract_answer(name, text) == answer)
    out = {name: round(float(np.mean(h)), 6) for name, h in hits.items()}
    out["average"] = round(float(np.mean(list(out.values()))), 6)
    return out

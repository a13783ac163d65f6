"""Tasks through HF ``datasets``: offline corpora, GLUE by hub name, local files; tokenization.

Offline tasks (from `aroma_jax.data.offline` assets), split 80/10/10 by a seeded permutation of the
*deduplicated, normalised* texts, so the same text never lands in two splits:

* ``rotten_tomatoes`` — fresh (1) vs rotten (0) review snippets (binary, like SST-2);
* ``vader_movies`` — movie snippets with a human sentiment score in [-4, 4] (regression, like
  STS-B); every sentence that also occurs in the Rotten Tomatoes *test* split is dropped, since
  the two corpora largely share sentences;
* ``bbc_topic`` — BBC headline + lead -> one of 5 topics;
* ``bbc_headline_match`` — (headline, article lead) pairs, 1 if they belong together (balanced);
* ``bbc_headline`` — article lead -> headline (one-line summary generation, like XSum).

The paper's tasks have their own modules: ``glue/<task>`` (`aroma_jax.data.glue`),
``commonsense170k`` (`aroma_jax.data.commonsense`) and ``xsum`` (`aroma_jax.data.xsum`), each from
the hub or a local copy in the hub schema. ``local:<file>`` loads a csv/json/jsonl/parquet file
with ``text_field``/``label_field`` (``text_pair_field`` optional).
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import io
import math
import re
import tarfile
import unicodedata
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from aroma_jax.data.base import DataError, Task
from aroma_jax.data.labels import class_ids, map_classes  # noqa: F401  (re-exported)
from aroma_jax.data.offline import asset_path

SPLITS = ("train", "validation", "test")
BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    return re.sub(r"[^a-z0-9]+", " ", text).strip()


def split_unique(rows: list[dict], key: str, seed: int) -> dict[str, list[dict]]:
    """Dedupes on normalised ``key`` (first wins), sorts, then a seeded 80/10/10 split."""
    seen: dict[str, dict] = {}
    for row in rows:
        seen.setdefault(normalise(row[key]), row)
    keys = sorted(k for k in seen if k)
    order = np.random.default_rng(seed).permutation(len(keys))
    n_val = n_test = len(keys) // 10
    parts = {
        "test": order[:n_test],
        "validation": order[n_test : n_test + n_val],
        "train": order[n_test + n_val :],
    }
    return {s: [seen[keys[i]] for i in sorted(idx)] for s, idx in parts.items()}


def _dataset(rows: list[dict]) -> datasets.Dataset:
    return datasets.Dataset.from_list(rows)


def _rotten_rows(data_dir=None) -> list[dict]:
    path = asset_path("rotten_tomatoes", data_dir) / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8") as f:
        return [
            {"text": r["text"].strip(), "label": int(r["category"] == "fresh")}
            for r in csv.DictReader(f)
            if r["category"] in ("fresh", "rotten")
        ]


def rotten_tomatoes(seed: int = 0, data_dir=None) -> Task:
    parts = split_unique(_rotten_rows(data_dir), "text", seed)
    return Task(
        "rotten_tomatoes",
        "classification",
        2,
        {s: _dataset(parts[s]) for s in SPLITS},
        label_names=("rotten", "fresh"),
        metrics=("accuracy", "f1", "mcc"),
    )


def vader_movies(seed: int = 0, data_dir=None) -> Task:
    path = asset_path("vader", data_dir) / "hutto_ICWSM_2014.tar.gz"
    with tarfile.open(path) as tf:
        member = next(
            m for m in tf.getmembers() if m.name.endswith("movieReviewSnippets_GroundTruth.txt")
        )
        raw = tf.extractfile(member).read().decode("utf-8", errors="replace")  # type: ignore
    rows = []
    for line in io.StringIO(raw):
        parts = line.rstrip("\r\n").split("\t")
        if len(parts) >= 3:
            rows.append({"text": parts[2].strip(), "label": float(parts[1])})
    # Never evaluate one corpus on sentences the other trains on: drop every sentence of the
    # Rotten Tomatoes test split (the two corpora overlap heavily).
    rt_test = {normalise(r["text"]) for r in rotten_tomatoes(seed, data_dir).splits["test"]}
    rows = [r for r in rows if normalise(r["text"]) not in rt_test]
    parts = split_unique(rows, "text", seed)
    return Task(
        "vader_movies",
        "regression",
        1,
        {s: _dataset(parts[s]) for s in SPLITS},
        metrics=("pearson", "spearman"),
    )


def _bbc_rows(data_dir=None) -> list[dict]:
    root = asset_path("bbc", data_dir)
    rows = []
    for label, topic in enumerate(BBC_TOPICS):
        for f in sorted((root / topic).glob("*.txt")):
            lines = [x.strip() for x in f.read_text(encoding="latin-1").splitlines()]
            lines = [x for x in lines if x]
            if len(lines) < 2:
                continue
            rows.append(
                {"headline": lines[0], "lead": " ".join(lines[1:4]), "label": label, "topic": topic}
            )
    return rows


def bbc(name: str, seed: int = 0, data_dir=None) -> Task:
    parts = split_unique(_bbc_rows(data_dir), "headline", seed)
    if name == "bbc_topic":
        splits = {
            s: _dataset(
                [
                    {
                        "text": f"{r['headline']}. {r['lead']}",
                        "label": r["label"],
                        "topic": r["topic"],
                    }
                    for r in parts[s]
                ]
            )
            for s in SPLITS
        }
        return Task(
            name,
            "classification",
            5,
            splits,
            label_names=BBC_TOPICS,
            metrics=("accuracy", "f1_macro"),
        )
    if name == "bbc_headline":
        splits = {
            s: _dataset([{"text": r["lead"], "target": r["headline"]} for r in parts[s]])
            for s in SPLITS
        }
        return Task(name, "generation", 0, splits, metrics=("rouge1", "rouge2", "rougeL"))
    if name == "bbc_headline_match":
        splits = {}
        for s in SPLITS:
            rows, rng = parts[s], np.random.default_rng([seed, SPLITS.index(s)])
            shift = rng.permutation(len(rows))
            out = []
            for i, r in enumerate(rows):
                if i % 2 == 0:
                    out.append({"text": r["headline"], "text_pair": r["lead"], "label": 1})
                else:  # a headline from another article of the same split
                    j = shift[i] if shift[i] != i else (i + 1) % len(rows)
                    out.append({"text": rows[j]["headline"], "text_pair": r["lead"], "label": 0})
            splits[s] = _dataset(out)
        return Task(
            name,
            "pair_classification",
            2,
            splits,
            text_pair_field="text_pair",
            metrics=("accuracy", "f1"),
        )
    raise DataError(f"unknown BBC task {name!r}")



BAD_ROWS = ("error", "drop")


def _check_utf8(p: Path) -> None:
    """Text formats must be UTF-8; the error names the line and byte (1-based line)."""
    data = p.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(
            f"local data file {str(p)!r} is not UTF-8: byte 0x{data[err.start]:02x} at line "
            f"{line}; accepted UTF-8 text (re-save the file as UTF-8)"
        ) from None


def _row_problem(row: dict, text_fields: list[str], label_field: str) -> str | None:
    """Why a row cannot be used (an empty text or label cell, a NaN label), or None."""
    for field in text_fields:
        value = row[field]
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return f"empty {field!r} cell"
        if isinstance(value, str) and not value.strip():
            return f"blank {field!r} cell"
    label = row[label_field]
    if label is None:
        return f"empty {label_field!r} cell"
    if isinstance(label, float) and not math.isfinite(label):
        return f"{label_field!r} is {label}"
    if isinstance(label, str):
        return f"blank {label_field!r} cell" if not label.strip() else None
    if isinstance(label, bool) or not isinstance(label, (int, float, np.integer, np.floating)):
        return f"{label_field!r} is {label!r}, not a number or a class name"
    return None


def _number(text: str) -> int | float | None:
    """``"3"`` -> 3, ``"0.5"`` -> 0.5, anything else None."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None



def text_labels(
    labels: list, label_names: list[str] | tuple[str, ...] | None, where: str
) -> tuple[list, tuple[str, ...]]:
    """Labels as read from a file -> (labels, class names).

    Numbers stay numbers (class ids or regression targets); ``label_names`` then names the ids.
    Text labels that all read as numbers (``"1"`` in a JSON file) become numbers; other text
    labels are class names mapped by `class_ids`. A column that mixes numbers with other text is
    an error naming the first text cell (a typo in a numeric column must not turn a regression
    into a many-class classification).
    """
    if not any(isinstance(x, str) for x in labels):
        return labels, tuple(str(n) for n in label_names or ())
    parsed = [_number(x) if isinstance(x, str) else x for x in labels]
    if all(p is not None for p in parsed):
        return parsed, tuple(str(n) for n in label_names or ())
    numbers = [p is not None for p in parsed]
    if any(numbers):  # numeric cells beside text ones
        row = next(i for i, p in enumerate(parsed) if p is None)
        raise DataError(
            f"{where}: the label column mixes numbers and text (row {row + 1}: "
            f"{labels[row]!r}): accepted numbers only (class ids or regression targets), or "
            "class names only"
        )
    stripped = [x.strip() for x in labels]
    return class_ids(stripped, label_names, where)


def clean_rows(
    rows: list[dict], text_fields: list[str], label_field: str, path: str, bad_rows: str
) -> list[dict]:
    """Rows with usable cells; a bad row (1-based row number, header not counted) is an error
    under ``bad_rows="error"`` and left out, with a count on stderr, under ``"drop"``."""
    if bad_rows not in BAD_ROWS:
        raise DataError(f"invalid task.bad_rows={bad_rows!r}: accepted one of {BAD_ROWS}")
    problems = [
        (i + 1, why)
        for i, r in enumerate(rows)
        if (why := _row_problem(r, text_fields, label_field))
    ]
    if not problems:
        return rows
    listed = "; ".join(f"row {n}: {why}" for n, why in problems[:5])
    more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
    if bad_rows == "error":
        raise DataError(
            f"{path!r} has {len(problems)} unusable row(s): {listed}{more}. Fix them, or set "
            "task.bad_rows=drop to leave them out"
        )
    import sys

    print(f"{path!r}: dropped {len(problems)} unusable row(s): {listed}{more}", file=sys.stderr)
    dropped = {n - 1 for n, _ in problems}
    return [r for i, r in enumerate(rows) if i not in dropped]


def local(
    path: str,
    seed: int = 0,
    text_field: str = "text",
    label_field: str = "label",
    text_pair_field: str | None = None,
    bad_rows: str = "error",
    label_names: list[str] | tuple[str, ...] | None = None,
) -> Task:
    """A task from one file; ``bad_rows`` (``error`` or ``drop``) decides what an empty text or
    label cell or a NaN label does. Text labels are class names: ids in sorted order, or in the
    order of ``label_names`` (`text_labels`)."""
    p = Path(path)
    fmt = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(p.suffix)
    if fmt is None:
        raise DataError(f"local data {path!r}: accepted .csv, .json, .jsonl or .parquet files")
    if not p.exists():
        raise DataError(f"local data file {path!r} does not exist")
    if fmt != "parquet":
        _check_utf8(p)
    try:
        ds = datasets.load_dataset(fmt, data_files=str(p), split="train")
    except Exception as err:  # pyarrow and datasets raise many types for malformed files
        cause = err.__cause__ or err.__context__ or err
        raise DataError(
            f"cannot read local data file {path!r} as {fmt}: {type(cause).__name__}: "
            f"{str(cause).splitlines()[0][:200] if str(cause) else ''}"
        ) from None
    needed = [c for c in (text_field, text_pair_field, label_field) if c]
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        raise DataError(
            f"{path!r} has no column(s) {missing}; columns that exist: "
            f"{ds.column_names}. Set task.text_field / task.label_field."
        )
    texts = [c for c in (text_field, text_pair_field) if c]
    rows = clean_rows([dict(r) for r in ds], texts, label_field, path, bad_rows)
    if not rows:
        raise DataError(f"{path!r} has no usable rows: accepted a file with text and label cells")
    for r in rows:  # a column of numbers is text too
        for field in texts:
            r[field] = str(r[field])
    raw = [r[label_field] for r in rows]
    from_text = any(isinstance(x, str) and _number(x) is None for x in raw)
    labels, names = text_labels(raw, label_names, repr(path))
    for r, y in zip(rows, labels, strict=True):
        r[label_field] = y
    if all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in labels):
        kind, n = "classification", max(int(max(labels)) + 1, len(names))
        bad = [(i, x) for i, x in enumerate(labels) if x < 0]
        if bad:
            raise DataError(
                f"{path!r}: label {bad[0][1]} in row {bad[0][0] + 1} is out of range: "
                "accepted integer class ids >= 0"
            )
        if names and n > len(names):
            raise DataError(
                f"{path!r}: label {n - 1} has no name in task.label_names {list(names)}: "
                f"accepted {n} names, one per class id"
            )
    else:
        kind, n = "regression", 1
        if names:
            raise DataError(
                f"{path!r} has numeric, non-integer labels (a regression task): "
                "task.label_names applies to class labels only"
            )
    if text_pair_field and kind == "classification":
        kind = "pair_classification"
    parts = split_unique(rows, text_field, seed) if not text_pair_field else None
    if parts is None:
        order = np.random.default_rng(seed).permutation(len(rows))
        k = len(rows) // 10
        parts = {
            "test": [rows[i] for i in order[:k]],
            "validation": [rows[i] for i in order[k : 2 * k]],
            "train": [rows[i] for i in order[2 * k :]],
        }
    return Task(
        f"local:{path}",
        kind,
        n,
        {s: _dataset(parts[s]) for s in SPLITS},
        text_field=text_field,
        text_pair_field=text_pair_field,
        label_field=label_field,
        label_names=names,
        text_labels=from_text,
        metrics=("accuracy", "f1") if kind != "regression" else ("pearson", "spearman"),
    )


OFFLINE = ("rotten_tomatoes", "vader_movies", "bbc_topic", "bbc_headline", "bbc_headline_match")
PAPER = ("glue/<task>", "commonsense170k[/<set>,...]", "xsum")


def get_task(
    name: str,
    seed: int = 0,
    data_dir=None,
    source: str | None = None,
    eval_source: str | None = None,
    dev_examples: int = 0,
    **fields: Any,
) -> Task:
    """A task by name: an offline task, one of the paper's (`PAPER`) or ``local:<file>``.

    ``source`` (a hub name or a local copy in the hub schema), ``eval_source`` (commonsense
    evaluation sets) and ``dev_examples`` (a seeded dev split carved from train) apply to the
    paper's tasks; see `aroma_jax.data.glue`, `aroma_jax.data.commonsense`, `aroma_jax.data.xsum`.
    """
    is_cs = name == "commonsense170k" or name.startswith("commonsense170k/")
    is_paper = name.startswith("glue/") or is_cs or name == "xsum"
    label_names = fields.pop("label_names", None)
    if label_names is not None and not (name.startswith(("glue/", "local:"))):
        raise DataError(
            f"task {name!r} takes no task.label_names: it applies to local:<file> and "
            "glue/<task> (the other tasks name their classes themselves)"
        )
    if ((source is not None or dev_examples) and not is_paper) or (eval_source and not is_cs):
        raise DataError(
            f"task {name!r} takes no task.source / task.eval_source / task.dev_examples: "
            "task.source and task.dev_examples apply to glue/<task>, commonsense170k and xsum; "
            "task.eval_source to commonsense170k only"
        )
    if name == "rotten_tomatoes":
        task = rotten_tomatoes(seed, data_dir)
    elif name == "vader_movies":
        task = vader_movies(seed, data_dir)
    elif name.startswith("bbc_"):
        task = bbc(name, seed, data_dir)
    elif name.startswith("glue/"):
        from aroma_jax.data.glue import glue

        task = glue(name.split("/", 1)[1], seed, source, dev_examples, label_names)
    elif is_cs:
        from aroma_jax.data.commonsense import commonsense

        sets = name.split("/", 1)[1] if "/" in name else None
        task = commonsense(sets, seed, source, eval_source, dev_examples)
    elif name == "xsum":
        from aroma_jax.data.xsum import xsum

        task = xsum(seed, source, dev_examples)
    elif name.startswith("local:"):
        task = local(name.split(":", 1)[1], seed, label_names=label_names, **fields)
    else:
        raise DataError(
            f"unknown task {name!r}: accepted {', '.join(OFFLINE)}, {', '.join(PAPER)} "
            f"(GLUE tasks: cola, mnli, mrpc, qnli, qqp, rte, sst2, stsb) or "
            "local:<file.csv|json|jsonl|parquet>"
        )
    validate(task)
    return task


def validate(task: Task) -> None:
    """Splits not empty, columns present and classification labels in range, with the offending
    row named."""
    for split, ds in task.splits.items():
        if len(ds) == 0:
            sizes = {s: len(d) for s, d in task.splits.items()}
            raise DataError(
                f"task {task.name!r} split {split!r} is empty (split sizes {sizes}); the held-out "
                "splits are 10% each of the usable, distinct rows: accepted data with at least "
                "10 such rows"
            )
        needed = [task.text_field]
        if task.text_pair_field:
            needed.append(task.text_pair_field)
        needed.append(task.target_field if task.kind == "generation" else task.label_field)
        missing = [c for c in needed if c not in ds.column_names]
        if missing:
            raise DataError(
                f"task {task.name!r} split {split!r} has no column(s) {missing}; "
                f"columns that exist: {ds.column_names}"
            )
        if task.kind in ("classification", "pair_classification"):
            labels = np.asarray(ds[task.label_field])
            bad = np.nonzero((labels < 0) | (labels >= task.num_labels))[0]
            if len(bad):
                raise DataError(
                    f"task {task.name!r} split {split!r} row {int(bad[0])}: label "
                    f"{labels[bad[0]]} is out of range; accepted 0..{task.num_labels - 1}"
                )


def check_learnable(task: Task) -> None:
    """Refuses data a run cannot learn from (after the split and the example caps): a
    classification whose training split holds fewer than 2 classes (it would train a constant
    and report its trivial accuracy), a regression whose labels do not vary in some split
    (nothing to fit; Pearson and Spearman are undefined)."""
    if task.kind in ("classification", "pair_classification"):
        labels = np.asarray(task.splits["train"][task.label_field])
        found = sorted({int(x) for x in labels})
        if len(found) < 2:
            shown = [
                f"{c} ({task.label_names[c]!r})" if c < len(task.label_names) else str(c)
                for c in found
            ]
            raise DataError(
                f"task {task.name!r} split 'train' holds {len(found)} class ({', '.join(shown)} "
                f"in all {len(labels)} rows): a classifier needs at least 2; accepted data with "
                "two or more classes in the training split"
            )
    if task.kind == "regression":
        for split, ds in task.splits.items():
            labels = np.asarray(ds[task.label_field], np.float64)
            if len(labels) and float(np.ptp(labels)) == 0.0:
                raise DataError(
                    f"task {task.name!r} split {split!r}: every regression label is "
                    f"{labels[0]:g} ({len(labels)} rows, zero variance): nothing to fit and "
                    "Pearson/Spearman are undefined; accepted labels that vary"
                )


def limit(task: Task, max_train: int | None, max_eval: int | None) -> Task:
    """Caps split sizes (the first rows of the already shuffled splits). A split made of several
    evaluation sets (a ``set`` column, as in commonsense170k) is capped per set."""
    splits = {}
    for s, ds in task.splits.items():
        cap = max_train if s == "train" else max_eval
        if cap and s != "train" and "set" in ds.column_names:
            seen: dict[str, int] = {}
            keep = []
            for i, name in enumerate(ds["set"]):
                seen[name] = seen.get(name, 0) + 1
                if seen[name] <= cap:
                    keep.append(i)
            splits[s] = ds.select(keep)
        else:
            splits[s] = ds.select(range(min(cap, len(ds)))) if cap else ds
    return dataclasses.replace(task, splits=splits)


# ------------------------------------------------------------------------- tokenization
def encode_classification(task: Task, tok, split: str, max_len: int) -> dict[str, np.ndarray]:
    ds = task.splits[split]
    pair = list(ds[task.text_pair_field]) if task.text_pair_field else None
    enc = tok(
        list(ds[task.text_field]),
        pair,
        max_length=max_len,
        truncation=True,
        padding="max_length",
        return_tensors="np",
    )
    out = {
        k: enc[k].astype(np.int32)
        for k in ("input_ids", "attention_mask", "token_type_ids")
        if k in enc
    }
    dtype = np.float32 if task.kind == "regression" else np.int32
    out["labels"] = np.asarray(ds[task.label_field], dtype)
    return out


def encode_seq2seq(
    task: Task, tok, split: str, max_len: int, target_len: int, decoder_start: int
) -> dict[str, np.ndarray]:
    ds = task.splits[split]
    src = tok(
        list(ds[task.text_field]),
        max_length=max_len,
        truncation=True,
        padding="max_length",
        return_tensors="np",
    )
    tgt = tok(
        list(ds[task.target_field]),
        max_length=target_len,
        truncation=True,
        padding="max_length",
        return_tensors="np",
    )
    labels = np.where(tgt["attention_mask"] == 1, tgt["input_ids"], -100).astype(np.int32)
    dec = np.concatenate([np.full((len(labels), 1), decoder_start), tgt["input_ids"][:, :-1]], 1)
    dec_mask = np.concatenate([np.ones((len(labels), 1)), tgt["attention_mask"][:, :-1]], 1)
    return {
        "input_ids": src["input_ids"].astype(np.int32),
        "attention_mask": src["attention_mask"].astype(np.int32),
        "decoder_input_ids": dec.astype(np.int32),
        "decoder_attention_mask": dec_mask.astype(np.int32),
        "labels": labels,
    }


def _prompt(task: Task, row: dict) -> str:
    if task.kind == "generation":
        return f"Article: {row[task.text_field]}\nHeadline:"
    if task.text_pair_field:
        return f"{row[task.text_field]}\n{row[task.text_pair_field]}\nAnswer:"
    return (
        f"{row[task.text_field]}\nTopic:"
        if task.name == "bbc_topic"
        else f"{row[task.text_field]}\nAnswer:"
    )


def _answers(task: Task) -> tuple[str, ...]:
    if task.label_names:
        return task.label_names
    return tuple(str(i) for i in range(task.num_labels))


def _pack(tok, prompts: list[str], targets: list[str], max_len: int) -> dict[str, np.ndarray]:
    """Left-truncated prompt + target, right-padded; loss_mask marks target tokens."""
    ids = np.full((len(prompts), max_len), tok.pad_token_id or 0, np.int32)
    att = np.zeros((len(prompts), max_len), np.int32)
    mask = np.zeros((len(prompts), max_len), np.int32)
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    for i, (p, t) in enumerate(zip(prompts, targets, strict=True)):
        t_ids = tok(t, add_special_tokens=False)["input_ids"][: max_len // 2] + eos
        p_ids = tok(p, add_special_tokens=False)["input_ids"][-(max_len - len(t_ids)) :]
        seq = p_ids + t_ids
        ids[i, : len(seq)] = seq
        att[i, : len(seq)] = 1
        mask[i, len(p_ids) : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": att, "loss_mask": mask}


def encode_causal_lm(task: Task, tok, split: str, max_len: int) -> dict[str, np.ndarray]:
    rows = list(task.splits[split])
    prompts = [_prompt(task, r) for r in rows]
    if task.kind == "generation":
        targets = [" " + r[task.target_field] for r in rows]
    else:
        answers = _answers(task)
        targets = [" " + answers[int(r[task.label_field])] for r in rows]
    return _pack(tok, prompts, targets, max_len)


def encode_choices(task: Task, tok, split: str, max_len: int):
    """Every example once per answer, for multiple-choice scoring: (arrays, labels, n)."""
    rows = list(task.splits[split])
    answers = _answers(task)
    prompts = [_prompt(task, r) for r in rows for _ in answers]
    targets = [" " + a for _ in rows for a in answers]
    arrays = _pack(tok, prompts, targets, max_len)
    labels = np.asarray([int(r[task.label_field]) for r in rows])
    return arrays, labels, len(answers)


def encode_prompts(task: Task, tok, split: str, max_len: int) -> dict[str, np.ndarray]:
    """Left-padded prompts for generation."""
    rows = list(task.splits[split])
    ids = np.full((len(rows), max_len), tok.pad_token_id or 0, np.int32)
    att = np.zeros((len(rows), max_len), np.int32)
    for i, r in enumerate(rows):
        p = tok(_prompt(task, r), add_special_tokens=False)["input_ids"][-max_len:]
        ids[i, max_len - len(p) :] = p
        att[i, max_len - len(p) :] = 1
    return {"input_ids": ids, "attention_mask": att}

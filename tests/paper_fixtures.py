"""Small local copies of the paper's data sets, each in its hub dataset's exact schema.

Written by the tests (nothing is downloaded): GLUE (``nyu-mll/glue`` parquet per task), the
Commonsense170K file (LLM-Adapters' JSON list), the eight commonsense evaluation sets in their
hub schemas, and XSum (``EdinburghNLP/xsum``). Row counts are tiny; texts are varied enough for
word-level tokenizers and seeded splits.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
from datasets import ClassLabel, Features, Sequence, Value

WORDS = "red green blue cat dog bird runs sleeps eats big small old new fast slow".split()


def _sentence(i: int, n: int = 6) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n)) + f" {i}"


def write_glue(root: Path, n_train: int = 48, n_val: int = 16) -> Path:
    """mrpc, rte, stsb, cola and mnli in the nyu-mll/glue parquet layout and features."""
    pair = Features(
        {
            "sentence1": Value("string"),
            "sentence2": Value("string"),
            "label": ClassLabel(names=["not_equivalent", "equivalent"]),
            "idx": Value("int32"),
        }
    )
    specs = {
        "mrpc": (pair, ("train", "validation")),
        "rte": (
            Features(
                {
                    "sentence1": Value("string"),
                    "sentence2": Value("string"),
                    "label": ClassLabel(names=["entailment", "not_entailment"]),
                    "idx": Value("int32"),
                }
            ),
            ("train", "validation"),
        ),
        "stsb": (
            Features(
                {
                    "sentence1": Value("string"),
                    "sentence2": Value("string"),
                    "label": Value("float32"),
                    "idx": Value("int32"),
                }
            ),
            ("train", "validation"),
        ),
        "cola": (
            Features(
                {
                    "sentence": Value("string"),
                    "label": ClassLabel(names=["unacceptable", "acceptable"]),
                    "idx": Value("int32"),
                }
            ),
            ("train", "validation"),
        ),
        "mnli": (
            Features(
                {
                    "premise": Value("string"),
                    "hypothesis": Value("string"),
                    "label": ClassLabel(names=["entailment", "neutral", "contradiction"]),
                    "idx": Value("int32"),
                }
            ),
            ("train", "validation_matched", "validation_mismatched"),
        ),
    }
    for task, (features, splits) in specs.items():
        for split in splits:
            n = n_train if split == "train" else n_val
            off = 0 if split == "train" else 1000
            rows = []
            for i in range(n):
                j = i + off
                row = {"idx": i}
                cols = [c for c in features if c not in ("label", "idx")]
                for k, c in enumerate(cols):
                    row[c] = _sentence(j + 31 * k)
                if task == "stsb":
                    row["label"] = float(j % 6) * 5 / 5
                else:
                    row["label"] = j % features["label"].num_classes
                rows.append(row)
            out = root / task / f"{split}-00000-of-00001.parquet"
            out.parent.mkdir(parents=True, exist_ok=True)
            datasets.Dataset.from_list(rows, features=features).to_parquet(str(out))
    return root


# One hub-schema row per evaluation set (the schemas of the hub datasets LLM-Adapters used).
def _eval_rows(name: str, i: int) -> dict:
    s = _sentence(i)
    choices4 = {"text": [f"{WORDS[(i + k) % 15]} choice" for k in range(4)], "label": list("ABCD")}
    return {
        "boolq": {"question": f"is {s}", "answer": bool(i % 2), "passage": f"{s}. {s}."},
        "piqa": {"goal": s, "sol1": f"{s} one", "sol2": f"{s} two", "label": i % 2},
        "social_i_qa": {
            "context": s,
            "question": "What will happen?",
            "answerA": "red",
            "answerB": "green",
            "answerC": "blue",
            "label": str(i % 3 + 1),
        },
        "hellaswag": {
            "ind": i,
            "activity_label": "Running",
            "ctx_a": s,
            "ctx_b": "then",
            "ctx": f"{s} then",
            "endings": ["runs", "sleeps", "eats", "flies"],
            "source_id": f"src{i}",
            "split": "val",
            "split_type": "indomain",
            "label": str(i % 4),
        },
        "winogrande": {"sentence": f"{s} _ runs", "option1": "cat", "option2": "dog", "answer": str(i % 2 + 1)},  # noqa: E501
        "ARC-Easy": {"id": f"q{i}", "question": s, "choices": choices4, "answerKey": "ABCD"[i % 4]},  # noqa: E501
        "ARC-Challenge": {"id": f"q{i}", "question": s, "choices": {"text": ["a", "b", "c"], "label": ["1", "2", "3"]}, "answerKey": str(i % 3 + 1)},  # noqa: E501
        "openbookqa": {"id": f"o{i}", "question_stem": s, "choices": choices4, "answerKey": "ABCD"[i % 4]},  # noqa: E501
    }[name]  # fmt: skip


EVAL_FEATURES = {
    "piqa": Features(
        {
            "goal": Value("string"),
            "sol1": Value("string"),
            "sol2": Value("string"),
            "label": ClassLabel(names=["0", "1"]),
        }
    ),
    "hellaswag": Features(
        {
            "ind": Value("int32"),
            "activity_label": Value("string"),
            "ctx_a": Value("string"),
            "ctx_b": Value("string"),
            "ctx": Value("string"),
            "endings": Sequence(Value("string")),
            "source_id": Value("string"),
            "split": Value("string"),
            "split_type": Value("string"),
            "label": Value("string"),
        }
    ),
}


def write_commonsense(root: Path, n_train: int = 40, n_eval: int = 6) -> tuple[Path, Path]:
    """(Commonsense170K json file, evaluation-set directory in the hub schemas)."""
    from aroma_jax.data import commonsense

    names = list(commonsense.EVAL_SETS)
    train = []
    for i in range(n_train):  # training rows are the eight sets' instructions, as in 170K
        train.append(commonsense.to_instruction(names[i % 8], _eval_rows(names[i % 8], i)))
    root.mkdir(parents=True, exist_ok=True)
    train_file = root / "commonsense_170k.json"
    train_file.write_text(json.dumps(train, indent=1))
    evals = root / "eval"
    for name, spec in commonsense.EVAL_SETS.items():
        rows = [_eval_rows(name, 100 + i) for i in range(n_eval)]
        ds = datasets.Dataset.from_list(rows, features=EVAL_FEATURES.get(name))
        out = evals / name / f"{spec.split}-00000-of-00001.parquet"
        out.parent.mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(out))
    return train_file, evals


def write_xsum(root: Path, n: tuple[int, int, int] = (48, 8, 8)) -> Path:
    """EdinburghNLP/xsum's document, summary, id per split, as jsonl."""
    root.mkdir(parents=True, exist_ok=True)
    for split, count in zip(("train", "validation", "test"), n, strict=True):
        rows = []
        for i in range(count):
            j = i + 500 * ("train", "validation", "test").index(split)
            doc = " ".join(_sentence(j + k, 8) + "." for k in range(4))
            rows.append({"document": doc, "summary": _sentence(j, 5), "id": str(30000000 + j)})
        datasets.Dataset.from_list(rows).to_json(str(root / f"{split}.jsonl"))
    return root

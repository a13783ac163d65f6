"""GLUE as the paper runs it: train on the full train split, report on the validation split.

The paper (section 4.2, table 2) and the authors' runner report each task's GLUE *validation*
split (MNLI: ``validation_matched``) with one metric: Matthews correlation for CoLA, Pearson for
STS-B, accuracy for the rest. Here that split is the task's ``test`` split (what a run reports at
its end). The ``validation`` split, evaluated during training, is the same split unless
``dev_examples > 0``: then that many training examples, drawn by a seeded permutation, are held
out of ``train`` as a dev split for model selection.

Data come from the hub (``nyu-mll/glue``) or from a local copy in the same schema (see
`aroma_jax.data.sources`): ``DIR/<task>/train.parquet`` and ``DIR/<task>/validation.parquet``
(MNLI: ``validation_matched``), columns as on the hub (e.g. MRPC ``sentence1, sentence2, label,
idx``; STS-B's ``label`` a float in [0, 5]).

Example:
    >>> GLUE_TASKS["cola"].metric, GLUE_TASKS["mnli"].eval_split
    ('mcc', 'validation_matched')
"""

from __future__ import annotations

from typing import NamedTuple

from aroma_jax.data.base import DataError, Task
from aroma_jax.data.labels import map_classes
from aroma_jax.data.sources import load_splits, seeded_holdout

HUB_NAME = "nyu-mll/glue"


class GlueTask(NamedTuple):
    kind: str  # classification | pair_classification | regression
    num_labels: int
    text: str
    text_pair: str | None
    metric: str  # the paper's one metric (table 2)
    eval_split: str = "validation"


GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("classification", 2, "sentence", None, "mcc"),
    "sst2": GlueTask("classification", 2, "sentence", None, "accuracy"),
    "mrpc": GlueTask("pair_classification", 2, "sentence1", "sentence2", "accuracy"),
    "qqp": GlueTask("pair_classification", 2, "question1", "question2", "accuracy"),
    "stsb": GlueTask("regression", 1, "sentence1", "sentence2", "pearson"),
    "mnli": GlueTask(
        "pair_classification", 3, "premise", "hypothesis", "accuracy", "validation_matched"
    ),
    "qnli": GlueTask("pair_classification", 2, "question", "sentence", "accuracy"),
    "rte": GlueTask("pair_classification", 2, "sentence1", "sentence2", "accuracy"),
}


def glue(
    task: str,
    seed: int = 0,
    source: str | None = None,
    dev_examples: int = 0,
    label_names: list[str] | tuple[str, ...] | None = None,
) -> Task:
    """GLUE ``task`` from the hub or a local copy (``source``), split as described above.

    Class names come from the hub's ``ClassLabel`` feature; a local copy with text labels has
    them mapped to ids (`tasks.map_classes`), in sorted order or in that of ``label_names``."""
    if task not in GLUE_TASKS:
        raise DataError(f"unknown GLUE task {task!r}: accepted {', '.join(sorted(GLUE_TASKS))}")
    spec = GLUE_TASKS[task]
    parts = load_splits(source or HUB_NAME, task, ("train", spec.eval_split))
    train, report = parts["train"], parts[spec.eval_split]
    for name, ds in (("train", train), (spec.eval_split, report)):
        needed = [c for c in (spec.text, spec.text_pair, "label") if c]
        missing = [c for c in needed if c not in ds.column_names]
        if missing:
            raise DataError(
                f"GLUE {task} split {name!r} from {source or HUB_NAME!r} has no column(s) "
                f"{missing}; it has {ds.column_names} (expected the {HUB_NAME} schema)"
            )
    if isinstance(dev_examples, bool) or not isinstance(dev_examples, int) or dev_examples < 0:
        raise DataError(f"invalid task.dev_examples={dev_examples!r}: accepted an integer >= 0")
    names: tuple[str, ...] = ()
    from_text = False
    if spec.kind != "regression":
        where = repr(source or HUB_NAME)
        mapped, names, from_text = map_classes([train, report], "label", label_names, where)
        train, report = mapped
    dev = report
    if dev_examples:
        train, dev = seeded_holdout(train, dev_examples, seed)
    return Task(
        f"glue/{task}",
        spec.kind,
        spec.num_labels,
        {"train": train, "validation": dev, "test": report},
        text_field=spec.text,
        text_pair_field=spec.text_pair,
        label_names=names,
        text_labels=from_text,
        metrics=(spec.metric,),
    )

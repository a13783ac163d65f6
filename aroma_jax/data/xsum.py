"""XSum (Narayan et al. 2018): BBC article -> one-sentence summary, the paper's NLG task (table 4).

Hub ``EdinburghNLP/xsum`` (columns ``document, summary, id``; splits train / validation / test,
about 204k / 11k / 11k), or a local directory in that schema (see `aroma_jax.data.sources`).
Runs train on ``train``, evaluate ``validation`` during training and report ROUGE-1/2/L on
``test`` at the end. ``dev_examples > 0`` evaluates a seeded hold-out of that many training
rows during training instead (cheaper than the 11k validation articles).

Generation settings for BART-large on XSum (`GENERATION`) are the ones the released
``facebook/bart-large-xsum`` checkpoint ships in its ``config.json`` (beams 6, length penalty 1.0,
min length 11, no repeated trigrams), which are fairseq's XSum settings (``examples/bart``:
``--beam 6 --lenpen 1.0 --min-len 10 --no-repeat-ngram-size 3``; HF counts one more token for the
BOS). The maximum generated length is the paper's target length, 142 (table 14).

Example:
    >>> GENERATION["num_beams"], GENERATION["length_penalty"]
    (6, 1.0)
"""

from __future__ import annotations

from aroma_jax.data.base import DataError, Task
from aroma_jax.data.sources import load_splits, seeded_holdout

HUB_NAME = "EdinburghNLP/xsum"
GENERATION = {"num_beams": 6, "length_penalty": 1.0, "min_length": 11, "no_repeat_ngram_size": 3}


def xsum(seed: int = 0, source: str | None = None, dev_examples: int = 0) -> Task:
    parts = load_splits(source or HUB_NAME, None, ("train", "validation", "test"))
    for split, ds in parts.items():
        missing = [c for c in ("document", "summary") if c not in ds.column_names]
        if missing:
            raise DataError(
                f"XSum split {split!r} from {source or HUB_NAME!r} has no column(s) {missing}; "
                f"it has {ds.column_names} (expected {HUB_NAME}'s document, summary, id)"
            )
    if isinstance(dev_examples, bool) or not isinstance(dev_examples, int) or dev_examples < 0:
        raise DataError(f"invalid task.dev_examples={dev_examples!r}: accepted an integer >= 0")
    if dev_examples:
        parts["train"], parts["validation"] = seeded_holdout(parts["train"], dev_examples, seed)
    return Task(
        "xsum",
        "generation",
        0,
        parts,
        text_field="document",
        target_field="summary",
        metrics=("rouge1", "rouge2", "rougeL"),
    )

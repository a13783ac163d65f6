"""Hub dataset or local copy: one loader for the paper's data sets.

Every loader of the paper's tasks (`aroma_jax.data.glue`, `commonsense`, `xsum`) reads its data
through `load_splits`, which takes either a hub name (``nyu-mll/glue``; needs the hub) or a local
directory holding the same data in the same schema, one file per split::

    DIR[/CONFIG]/SPLIT.{parquet,jsonl,json,csv}     or  SPLIT-00000-of-00001.parquet (hub layout)

so a copy made with ``huggingface-cli download --repo-type dataset`` or with
``ds.to_parquet(f"{DIR}/{split}.parquet")`` loads offline, and tests can use small fixtures.

Example:
    >>> import tempfile, datasets
    >>> d = tempfile.mkdtemp()
    >>> _ = datasets.Dataset.from_list([{"x": 1}]).to_json(f"{d}/train.jsonl")
    >>> load_splits(d, None, ("train",))["train"][0]
    {'x': 1}
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import datasets

FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


class SourceError(ValueError):
    """A data source that cannot be read; the message names the path or split and what exists."""


def is_local(source: str) -> bool:
    return Path(source).expanduser().exists()


def split_files(root: Path, split: str) -> list[Path]:
    """The files of ``split`` in ``root``: ``SPLIT.ext`` or ``SPLIT-*.ext`` (sharded)."""
    out = []
    for ext in FORMATS:
        out += sorted(root.glob(f"{split}{ext}")) + sorted(root.glob(f"{split}-*{ext}"))
    return out


def load_splits(
    source: str, config: str | None, splits: Sequence[str]
) -> dict[str, datasets.Dataset]:
    """The named splits of a hub dataset (``config`` its subset) or of a local directory."""
    if not is_local(source):
        ds = datasets.load_dataset(source, config) if config else datasets.load_dataset(source)
        missing = [s for s in splits if s not in ds]
        if missing:
            raise SourceError(f"{source!r} has no split(s) {missing}; it has {sorted(ds)}")
        return {s: ds[s] for s in splits}
    root = Path(source).expanduser()
    if config and (root / config).is_dir():
        root = root / config
    out = {}
    for split in splits:
        files = split_files(root, split)
        if not files:
            present = sorted(p.name for p in root.iterdir()) if root.is_dir() else [root.name]
            raise SourceError(
                f"no file for split {split!r} in {str(root)!r}: accepted {split}.parquet, "
                f"{split}.jsonl, {split}.json, {split}.csv or {split}-*.<ext>; found {present}"
            )
        fmts = {FORMATS[f.suffix] for f in files}
        if len(fmts) > 1:
            raise SourceError(f"split {split!r} in {str(root)!r} mixes file formats: {files}")
        out[split] = datasets.load_dataset(
            fmts.pop(), data_files=[str(f) for f in files], split="train"
        )
    return out


def seeded_holdout(
    ds: datasets.Dataset, n: int, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(rest, held_out): ``n`` rows drawn by a seeded permutation, both in their original order."""
    if n < 0 or n >= len(ds):
        raise SourceError(
            f"cannot hold out {n} of {len(ds)} training examples: accepted 0 <= n < {len(ds)}"
        )
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(ds))
    held = sorted(int(i) for i in order[:n])
    rest = sorted(int(i) for i in order[n:])
    return ds.select(rest), ds.select(held)

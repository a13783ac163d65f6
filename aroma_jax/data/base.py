"""What every task loader returns, and the error it raises on bad data.

A module of its own so that the loaders of the paper's tasks (`aroma_jax.data.glue`,
`commonsense`, `xsum`) and the task registry that dispatches to them (`aroma_jax.data.tasks`)
both import it without importing each other.
"""

from __future__ import annotations

import dataclasses

import datasets


@dataclasses.dataclass
class Task:
    name: str
    kind: str  # classification | regression | pair_classification | generation
    num_labels: int
    splits: dict[str, datasets.Dataset]
    text_field: str = "text"
    text_pair_field: str | None = None
    label_field: str = "label"
    target_field: str = "target"
    label_names: tuple[str, ...] = ()
    text_labels: bool = False  # the data named its classes in text (mapped by label_names)
    metrics: tuple[str, ...] = ("accuracy",)


class DataError(ValueError):
    """Bad task data; the message names the column, row or value and what is accepted."""

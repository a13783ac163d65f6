"""Class labels given as names: one id mapping per task, shared by its splits.

Its own module so that the task registry (`aroma_jax.data.tasks`) and the paper-task loaders
(`aroma_jax.data.glue`) both use it without importing each other.
"""

from __future__ import annotations

import datasets

from aroma_jax.data.base import DataError


def class_ids(
    values: list, label_names: list[str] | tuple[str, ...] | None, where: str
) -> tuple[list[int], tuple[str, ...]]:
    """(ids, names) for class-name labels: ``names`` sorted, or ``label_names`` in its order.

    A label missing from ``label_names`` is an error naming it and its (1-based) row; at eval
    time ``label_names`` is the run's own mapping (saved in its config.yaml), so a class the run
    never saw is refused instead of being given a new id.
    """
    names = tuple(str(n) for n in label_names) if label_names else tuple(sorted(set(values)))
    index = {n: i for i, n in enumerate(names)}
    for row, value in enumerate(values, 1):
        if value not in index:
            raise DataError(
                f"{where}: label {value!r} in row {row} is not one of the classes "
                f"{list(names)} (task.label_names): accepted those names; add a new class to "
                "task.label_names and train a new run"
            )
    return [index[v] for v in values], names


def map_classes(
    parts: list[datasets.Dataset],
    field: str,
    label_names: list[str] | tuple[str, ...] | None,
    where: str,
) -> tuple[list[datasets.Dataset], tuple[str, ...], bool]:
    """One id mapping for the class labels of several splits of a hub dataset (or local copy).

    A ``ClassLabel`` feature keeps its ids and names (``label_names`` reorders them); text
    labels are mapped by `class_ids` over the classes of all splits together; numeric labels are
    kept, named by ``label_names`` if given. The flag says whether the labels were text.
    """
    feature = parts[0].features.get(field)
    if isinstance(feature, datasets.ClassLabel):
        if not label_names:
            return parts, tuple(feature.names), False
        values = [[feature.names[i] for i in ds[field]] for ds in parts]
    elif any(isinstance(v, str) for ds in parts for v in ds[field][:1]):
        values = [[str(v).strip() for v in ds[field]] for ds in parts]
    else:
        return parts, tuple(str(n) for n in label_names or ()), False
    every = [v for vs in values for v in vs]
    _, names = class_ids(every, label_names, where)
    out = []
    for ds, vs in zip(parts, values, strict=True):
        ids, _ = class_ids(vs, names, where)
        out.append(ds.remove_columns(field).add_column(field, ids))
    return out, names, not isinstance(feature, datasets.ClassLabel)

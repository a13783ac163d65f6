import numpy as np
import pytest

from aroma_jax.data import tasks
from aroma_jax.data.offline import AssetMissingError, asset_path


def texts(ds, field="text"):
    return {tasks.normalise(t) for t in ds[field]}


@pytest.mark.parametrize(
    "name", ["rotten_tomatoes", "bbc_topic", "bbc_headline", "bbc_headline_match", "vader_movies"]
)
def test_offline_tasks_deterministic_and_without_leakage(fake_assets, name):
    a, b = tasks.get_task(name, seed=3), tasks.get_task(name, seed=3)
    for s in tasks.SPLITS:
        assert a.splits[s][:] == b.splits[s][:]
        assert len(a.splits[s]) > 0
    if name != "bbc_headline_match":  # pairs reuse texts by design (mismatched headlines)
        tr, va, te = (texts(a.splits[s]) for s in tasks.SPLITS)
        assert not (tr & va) and not (tr & te) and not (va & te)
    c = tasks.get_task(name, seed=4)
    assert c.splits["test"][:] != a.splits["test"][:]


def test_vader_never_shares_a_sentence_with_rotten_tomatoes_test(fake_assets):
    rt_test = texts(tasks.get_task("rotten_tomatoes").splits["test"])
    vader = tasks.get_task("vader_movies")
    for s in tasks.SPLITS:
        assert not (texts(vader.splits[s]) & rt_test)
    assert vader.kind == "regression"


def test_headline_match_is_balanced(fake_assets):
    t = tasks.get_task("bbc_headline_match")
    labels = np.asarray(t.splits["train"]["label"])
    assert abs(labels.mean() - 0.5) < 0.05


def test_unknown_task_and_missing_asset(tmp_path, monkeypatch):
    with pytest.raises(tasks.DataError, match="rotten_tomatoes"):
        tasks.get_task("imdb")
    monkeypatch.setenv("AROMA_DATA", str(tmp_path))
    with pytest.raises(AssetMissingError, match="aroma-jax assets fetch bbc"):
        asset_path("bbc")


def test_local_files_missing_columns_and_bad_labels(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("sentence,y\n" + "".join(f"text number {i},{i % 2}\n" for i in range(40)))
    with pytest.raises(tasks.DataError) as err:
        tasks.get_task(f"local:{f}")
    assert "'text'" in str(err.value) and "sentence" in str(err.value)
    t = tasks.get_task(f"local:{f}", text_field="sentence", label_field="y")
    assert t.num_labels == 2 and t.kind == "classification"
    g = tmp_path / "bad.csv"
    g.write_text("text,label\n" + "".join(f"row {i},{-1 if i == 7 else 0}\n" for i in range(20)))
    with pytest.raises(tasks.DataError, match="out of range"):
        tasks.get_task(f"local:{g}")


def test_causal_lm_mask_covers_only_the_answer(fake_assets):
    from aroma_jax.models.hf import simple_tokenizer

    t = tasks.get_task("bbc_topic")
    tok = simple_tokenizer(list(t.splits["train"]["text"]) + ["Topic:"] + list(t.label_names))
    arr = tasks.encode_causal_lm(t, tok, "validation", 48)
    row, mask = arr["input_ids"][0], arr["loss_mask"][0].astype(bool)
    answer = tok.decode(row[mask], skip_special_tokens=True).strip()
    assert answer == t.label_names[t.splits["validation"][0]["label"]]

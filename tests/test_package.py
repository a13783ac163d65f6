"""The package carries what it needs: shipped run configs found by name or by their old
source-tree paths, and a wheel that, installed outside the checkout, runs `aroma-jax toy` and
resolves the demo's configs from another working directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from aroma_jax import configs, demo

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_configs_by_name_and_by_their_old_paths():
    demo_file = configs.root() / "demo-aroma.yaml"
    for name in (
        "demo-aroma",
        "demo-aroma.yaml",
        "experiments/configs/demo-aroma.yaml",
        "./experiments/configs/demo-aroma.yaml",
    ):
        assert configs.config_path(name) == demo_file, name
    preset = configs.config_path("experiments/paper/glue/aroma-mrpc.yaml")
    assert preset == configs.root() / "paper" / "glue" / "aroma-mrpc.yaml"
    assert "paper/glue/aroma-mrpc.yaml" in configs.names()
    assert "paper/paper_numbers.yaml" not in configs.names()  # the paper's tables, not a run
    with pytest.raises(FileNotFoundError, match=r"not exist.*demo-aroma, .*paper/<commonsense"):
        configs.resolve("nope.yaml")
    with pytest.raises(FileNotFoundError):  # a prefix inside another name is not the old path
        configs.config_path("myexperiments/configs/demo-aroma.yaml")


def test_an_existing_file_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo-aroma").write_text("train: {}\n")
    assert configs.resolve("demo-aroma") == Path("demo-aroma")
    assert configs.resolve("tiny-roberta") == configs.root() / "tiny-roberta.yaml"


def test_demo_configs_resolve_without_training():
    runs = demo.run_configs(["train.batch_size=4"], progress=False)
    assert list(runs) == ["aroma", "lora-r8"]
    (path, cfg), (_, lora) = runs["aroma"], runs["lora-r8"]
    assert path == configs.root() / "demo-aroma.yaml"
    assert cfg.train.batch_size == 4 and cfg.train.progress is False
    assert cfg.aroma.method == "aroma" and lora.aroma.method == "lora"


def _venv_with_wheel(tmp_path: Path) -> Path:
    """A fresh venv outside the checkout holding only the built wheel (no dependencies are
    downloaded: this interpreter's site-packages are appended to its path, after its own)."""
    # build from a copy, so the checkout gets no build/ or egg-info; not named "src": setuptools
    # 84's bdist_wheel fails on a project directory of that name ('has_pure_modules')
    src = tmp_path / "project"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "aroma_jax", src / "aroma_jax", ignore=shutil.ignore_patterns("__pycache__")
    )
    pip = [sys.executable, "-m", "pip"]
    wheels = tmp_path / "wheels"
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(src)]
    subprocess.run(build, check=True, capture_output=True)
    (wheel,) = wheels.glob("aroma_jax-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(
        subprocess.run(
            [
                str(venv / "bin" / "python"),
                "-c",
                "import sysconfig;print(sysconfig.get_paths()['purelib'])",
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (site / "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = [*pip, "--python", str(venv / "bin" / "python"), "install", "--no-deps", "--no-index"]
    subprocess.run([*install, "-q", str(wheel)], check=True, capture_output=True)
    return venv


@pytest.mark.slow
def test_the_installed_wheel_runs_outside_the_checkout(tmp_path):
    venv = _venv_with_wheel(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = dict(cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    check = (
        "import aroma_jax, pathlib\n"
        "from aroma_jax import configs, demo\n"
        "print(pathlib.Path(aroma_jax.__file__).parent)\n"
        "runs = demo.run_configs()\n"
        "print(sorted(runs), runs['aroma'][1].model.name)\n"
        "print(configs.resolve('experiments/paper/glue/aroma-mrpc.yaml'))\n"
    )
    got = subprocess.run([str(venv / "bin" / "python"), "-c", check], **run)
    assert got.returncode == 0, got.stderr[-2000:]
    where, runs, preset = got.stdout.strip().splitlines()
    assert Path(where).is_relative_to(venv) and not Path(where).is_relative_to(ROOT)
    assert runs.startswith("['aroma', 'lora-r8']")
    assert Path(preset).is_relative_to(venv) and Path(preset).is_file()
    toy = subprocess.run([str(venv / "bin" / "aroma-jax"), "toy"], **run)
    assert toy.returncode == 0, toy.stderr[-2000:]
    assert toy.stdout.strip()
    assert not (elsewhere / "experiments").exists() and not any(ROOT.glob("build"))

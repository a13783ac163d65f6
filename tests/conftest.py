import os
import shutil
import tempfile

# Several simulated CPU devices for the sharding tests; must be set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One XLA compilation cache for the whole session, shared with the subprocesses the CLI tests
# start (they inherit the environment): many tests compile the same train step again (a resumed
# run, the same tiny config in another test), and XLA:CPU compiles dominate the suite. A fresh
# directory per session, so nothing carries over between runs; the programs are identical either
# way, only their compile is skipped.
_CACHE_DIR = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE_DIR = tempfile.mkdtemp(prefix="aroma-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Tests marked ``hf4`` run transformers' Flax classes (transformers 4.x, `make test-hf4`).
    `make test` deselects them (``-m "not hf4"``); a run that selects them on transformers 5
    reports each as skipped with the reason, rather than failing deep inside transformers."""
    from aroma_jax.models.hf import hf_flax_available

    if hf_flax_available():
        return
    skip = pytest.mark.skip(reason="marked hf4: needs transformers 4.x (run `make test-hf4`)")
    for item in items:
        if "hf4" in item.keywords:
            item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    if _CACHE_DIR is not None:
        shutil.rmtree(_CACHE_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def fake_assets(tmp_path_factory):
    """Small stand-ins for the offline assets; sets AROMA_DATA for the session."""
    import fake_assets as fa

    root = fa.make(tmp_path_factory.mktemp("assets"))
    old = os.environ.get("AROMA_DATA")
    os.environ["AROMA_DATA"] = str(root)
    yield root
    if old is None:
        os.environ.pop("AROMA_DATA", None)
    else:
        os.environ["AROMA_DATA"] = old

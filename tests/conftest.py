import os

# Several simulated CPU devices for the sharding tests; must be set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


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

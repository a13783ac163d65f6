"""`sharding.initialize_distributed`: the AROMA_* environment, refused when incomplete (the
2-process runs themselves are in tests/train/test_multiprocess.py)."""

import pytest

from aroma_jax.core import sharding


@pytest.fixture
def clean_env(monkeypatch):
    for name in sharding.DISTRIBUTED_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_no_environment_is_one_process(clean_env):
    assert sharding.initialize_distributed() is False
    assert sharding.is_writer()
    sharding.barrier("one-process")  # a no-op, not a wait


@pytest.mark.parametrize(
    "env",
    [
        {"AROMA_COORDINATOR": "localhost:1234"},
        {"AROMA_NUM_PROCESSES": "2", "AROMA_PROCESS_ID": "0"},
        {"AROMA_COORDINATOR": "localhost:1234", "AROMA_NUM_PROCESSES": "2"},
    ],
)
def test_incomplete_environment_is_refused(clean_env, env):
    for k, v in env.items():
        clean_env.setenv(k, v)
    with pytest.raises(ValueError, match="AROMA_COORDINATOR=host:port AROMA_NUM_PROCESSES=N"):
        sharding.initialize_distributed()


def test_bad_numbers_are_refused(clean_env):
    clean_env.setenv("AROMA_COORDINATOR", "localhost:1234")
    clean_env.setenv("AROMA_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="AROMA_NUM_PROCESSES='two' is not a whole number"):
        sharding.initialize_distributed()
    clean_env.setenv("AROMA_NUM_PROCESSES", "2")
    clean_env.setenv("AROMA_PROCESS_ID", "2")
    with pytest.raises(ValueError, match="process id 2 is out of range for 2 processes"):
        sharding.initialize_distributed()

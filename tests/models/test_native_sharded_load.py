"""Per-process loading of a native model's safetensors: on 2 processes x 4 devices each process
copies only the slices of the weights its own devices hold, and the model computes the same
logits as when loaded whole."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import traverse_util
from native_tiny import tiny_config

from aroma_jax.core import sharding
from aroma_jax.models.native import NativeCausalLM, NativeConfig
from aroma_jax.models.native.partitioning import sharding_rules

WORKER = Path(__file__).resolve().parent / "sharded_load_worker.py"


def _expected_bytes(params: dict, mesh) -> int:
    """Bytes one of 2 processes must copy on an fsdp=8 mesh laid over both: half of every leaf
    sharded over fsdp (its 4 devices hold 4 of the 8 slices), all of a replicated one, once."""
    total = 0
    for path, leaf in traverse_util.flatten_dict(params, sep="/").items():
        spec = sharding.leaf_spec(path, leaf.shape, mesh, sharding_rules())
        total += leaf.nbytes // 2 if "fsdp" in tuple(spec) else leaf.nbytes
    return total


@pytest.mark.slow  # two processes: a minute on 2 cores
def test_two_processes_each_read_only_their_shards(tmp_path):
    import mp_launch

    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    model = NativeCausalLM(
        NativeConfig.from_dict(tiny_config(model_type="llama", tie_word_embeddings=False))
    )
    model_dir = model.save_pretrained(tmp_path / "model")
    whole = NativeCausalLM.from_pretrained(model_dir)
    ids = np.arange(2 * 6, dtype=np.int32).reshape(2, 6) % 64
    want = np.asarray(whole(ids).logits)
    params = jax.device_get(whole.params)
    model_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    expected = _expected_bytes(params, sharding.parse_mesh("fsdp=8", jax.devices()[:8]))
    assert expected < 0.6 * model_bytes  # the check below can tell half from whole

    procs = mp_launch.start(WORKER, [str(model_dir), str(tmp_path)])
    reports = [json.loads(out.strip().splitlines()[-1]) for out in mp_launch.finish(procs)]
    for r in reports:  # each process copied its own half, in either layout, and no more
        assert r["unrolled"] == expected, (r, expected, model_bytes)
        assert r["scanned"] == expected, (r, expected, model_bytes)
    for layout in ("unrolled", "scanned"):
        got = np.load(tmp_path / f"logits-{layout}.npy")
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

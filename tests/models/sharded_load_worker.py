"""One process of the per-process loading test (tests/models/test_native_sharded_load.py).

Usage: ``python sharded_load_worker.py MODEL_DIR OUT``; the process's place comes from the
``AROMA_*`` environment. Loads the tiny LLaMA at MODEL_DIR unrolled and scanned onto an fsdp=8
mesh over both processes, counting the bytes it copies out of the safetensors file
(`checkpoint_io.read`), and runs a forward pass. Process 0 saves the gathered logits; every
process prints its byte counts as one JSON line.
"""

import json
import sys
from pathlib import Path

from aroma_jax.core import sharding

sharding.initialize_distributed()  # before the imports below touch any device

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from aroma_jax.models.native import NativeCausalLM, checkpoint_io  # noqa: E402
from aroma_jax.models.native.partitioning import sharding_rules  # noqa: E402

copied: list[int] = []
_read = checkpoint_io.read


def counting_read(mapped, dtype):
    out = _read(mapped, dtype)
    copied.append(out.nbytes)
    return out


if __name__ == "__main__":
    model_dir, out = sys.argv[1], Path(sys.argv[2])
    checkpoint_io.read = counting_read
    mesh = sharding.parse_mesh("fsdp=8")
    ids = np.arange(2 * 6, dtype=np.int32).reshape(2, 6) % 64
    report = {"process": jax.process_index()}
    for scan in (False, True):
        copied.clear()
        stacked = {"model/layers": 2} if scan else None
        model = NativeCausalLM.from_pretrained(
            model_dir,
            scan_layers=scan,
            sharding_for=sharding.sharding_for(mesh, sharding_rules(), stacked),
        )
        report["scanned" if scan else "unrolled"] = sum(copied)
        placed = sharding.put_global(ids, NamedSharding(mesh, P()))
        logits = jax.jit(lambda p, x, m=model: m.module.apply({"params": p}, x))(
            model.params, placed
        )
        gathered = sharding.to_host(logits)  # a collective: every process takes part
        if jax.process_index() == 0:
            np.save(out / f"logits-{'scanned' if scan else 'unrolled'}.npy", gathered)
    print(json.dumps(report))

"""The lab beside the library: scripts that measure, simulate and reproduce, not part of the
installed package. Run them from the checkout's root as modules, ``python -m experiments.<name>``:

* `bench`: per-step time of every adapter variant against a frozen-model floor (docs/BENCHMARKS.md);
* `scale_sim`: the LLaMA-3 train step compiled for simulated meshes (docs/SCALE.md);
* `generate_speed`: greedy generation with and without the KV cache;
* `study`: a grid of runs behind the claims in docs/REPRODUCTION.md;
* `paper` (with `paper_plan`): the paper's tables from the shipped presets (docs/PAPER.md);
* `trace_run`: every number of short runs saved, two saves compared bit for bit;
* `shapes`: the model shapes all of them build.

Finished investigations (compile time) live in ``archive/``, outside the package and the tests.
"""

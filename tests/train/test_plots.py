import numpy as np

from aroma_jax.examples.toy import run_toy, toy_config
from aroma_jax.train import plots


def test_layer_matrix_grid():
    ranks = {
        "bert/encoder/layer/0/attention/self/query": 2,
        "bert/encoder/layer/1/attention/self/query": 0,
        "bert/encoder/layer/1/output/dense": 3,
    }
    layers, matrices, grid = plots.layer_matrix_grid(ranks)
    assert layers == [0, 1]
    assert matrices == ["attention/self/query", "output/dense"]
    assert grid[0].tolist() == [2, 0] and np.isnan(grid[1, 0]) and grid[1, 1] == 3


def test_plots_written_and_trainable_falls(tmp_path):
    res = run_toy(toy_config(max_steps=700))
    history = res["history"]
    sizes = {p: 56 for p in res["ranks"]}
    steps, trainable = plots.trainable_trajectory(history, sizes, head_params=10)
    assert trainable[0] == 3 * 56 + 10 and trainable[-1] < trainable[0]
    a = plots.plot_rank_growth(history, sizes, tmp_path / "p" / "growth.png")
    b = plots.plot_rank_map(res["ranks"], tmp_path / "p" / "map.png")
    assert a.stat().st_size > 5000 and b.stat().st_size > 5000

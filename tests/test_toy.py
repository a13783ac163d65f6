"""Toy recovery: AROMA finds planted ranks 0, 1 and 3 by itself."""

from aroma_jax.examples.toy import run_toy, toy_config


def test_aroma_recovers_true_ranks_and_the_teacher():
    res = run_toy(toy_config())
    for module, true_rank in res["true_ranks"].items():
        assert abs(res["ranks"][module] - true_rank) <= 1, res["ranks"]
    assert res["loss_after"] < 0.005 * res["loss_before"]
    assert res["compiles"] == 1
    assert len(res["outer_steps"]) >= 3


def test_lora_r8_reaches_the_loss_with_more_parameters():
    aroma = run_toy(toy_config())
    lora = run_toy(toy_config(method="lora", r=8, alpha=8.0, max_steps=1500))
    assert lora["loss_after"] < 0.005 * lora["loss_before"]
    assert lora["adapter_params"] == 8 * aroma["adapter_params"]

import pytest

from aroma_jax import AromaConfig, ConfigError
from aroma_jax.core.config import from_dict


def test_defaults_and_scale():
    cfg = AromaConfig(target_modules=["query", "value"], r=8, alpha=16.0)
    assert cfg.target_modules == ("query", "value")
    assert cfg.scale == 2.0
    assert hash(cfg) == hash(cfg.replace())


@pytest.mark.parametrize(
    "field,value,accepted",
    [
        ("r", 0, "integer >= 1"),
        ("r", 1.5, "integer >= 1"),
        ("alpha", -1.0, "finite number > 0"),
        ("inner_tol", -0.1, ">= 0"),
        ("prune_ratio", 1.5, "[0, 1]"),
        ("reset", "zero", "'prune', 'full', 'none'"),
        ("method", "vera", "'aroma', 'lora', 'relora'"),
        ("schedule", "step", "'linear'"),
        ("fold", "yes", "'auto'"),
        ("b2", 1.0, "[0, 1)"),
        ("inner_check_every", 0, "integer >= 1"),
    ],
)
def test_invalid_values_name_field_value_and_accepted(field, value, accepted):
    with pytest.raises(ConfigError) as err:
        AromaConfig(target_modules=("q",), **{field: value})
    msg = str(err.value)
    assert field in msg and repr(value) in msg and accepted in msg


def test_empty_targets_rejected():
    with pytest.raises(ConfigError, match="target_modules"):
        AromaConfig()


def test_unknown_keys_listed_with_valid_ones():
    with pytest.raises(ConfigError) as err:
        from_dict({"target_modules": ["q"], "inner_tolerance": 0.1})
    msg = str(err.value)
    assert "inner_tolerance" in msg and "inner_tol" in msg and "outer_tol" in msg

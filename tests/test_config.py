"""Config loading: recipe, variant, overrides, validation."""
import pytest

from trainer.config import ConfigError, load_config


def test_demo_recipe_loads_with_overrides():
    cfg = load_config("demo", ["train.epochs=3", "optim.lr=0.05", "wandb.tags=[a, b]"])
    assert cfg.train.epochs == 3 and cfg.optim.lr == 0.05 and cfg.wandb.tags == ("a", "b")
    assert cfg.recipe == "demo" and cfg.model.name == "efficientnet_b0"


@pytest.mark.parametrize("override, message", [
    ("train.epochz=3", "unknown config key 'train.epochz'"),
    ("nosuch.key=1", "unknown config key 'nosuch'"),
    ("train.epochs=many", "config key 'train.epochs'"),
    ("optim.lr=-1", "config key 'optim.lr'"),
    ("engine.precision=fp8", "config key 'engine.precision'"),
    ("engine.zero_stage=3", "config key 'engine.zero_stage'"),
    ("train.epochs", "not key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        load_config("demo", [override])
    assert "\n" not in str(err.value)


def test_unknown_recipe_lists_available():
    with pytest.raises(ConfigError, match="unknown recipe 'nope'.*demo"):
        load_config("nope")


def test_config_is_frozen():
    cfg = load_config("demo")
    with pytest.raises(Exception):
        cfg.train.epochs = 1

"""Run configuration: YAML files, command-line overrides, and errors that name the key."""

from pathlib import Path

import pytest

from atpo_fast.config import TrainConfig, load_config, save_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_files_parse():
    assert load_config(CONFIGS / "tiny.yaml") == TrainConfig(), "tiny.yaml is the built-in default"
    llada = load_config(CONFIGS / "llada.yaml", ["model.path=/models/llada"])
    assert (llada.model.kind, llada.model.path, llada.warmstart.steps) == ("llada", "/models/llada", 0)
    assert load_config(CONFIGS / "dream.yaml").model.kind == "dream"


def test_overrides_and_round_trip(tmp_path):
    config = load_config(None, ["optim.lr=3e-5", "selection.rule=uniform", "sampler.threshold=0.9", "seed=7",
                                "task.options={min_blanks: 5}", "logging.tensorboard=true", "model.path=null"])
    assert config.optim.lr == 3e-5 and isinstance(config.optim.lr, float)
    assert (config.selection.rule, config.sampler.threshold, config.seed) == ("uniform", 0.9, 7)
    assert config.task.options == {"min_blanks": 5} and config.logging.tensorboard is True
    save_config(config, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == config


@pytest.mark.parametrize("overrides,match", [
    (["optim.lrr=1"], "unknown config key 'optim.lrr'"),
    (["optimizer.lr=1"], "unknown config key 'optimizer'"),
    (["optim.lr=fast"], "config key 'optim.lr' expects float, got 'fast'"),
    (["optim.iterations=2.5"], "config key 'optim.iterations' expects int"),
    (["logging.tensorboard=maybe"], "config key 'logging.tensorboard' expects bool"),
    (["seed=true"], "config key 'seed' expects int"),
    (["task.options=3"], "config key 'task.options' expects dict"),
    (["optim=3"], "config section 'optim' must be a mapping"),
    (["optim.lr"], "must look like section.key=value"),
    (["seed.value=1"], "config key 'seed' expects int"),
])
def test_bad_keys_and_values(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, overrides)


def test_missing_file():
    with pytest.raises(ValueError, match="config file 'nope.yaml' does not exist"):
        load_config("nope.yaml")

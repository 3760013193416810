"""Config merging and bad-input messages (defaults <- YAML <- dotlist)."""

import pytest

from longreach.launch.config import ConfigError, RunConfig, load_config, to_yaml
from longreach.launch.cli import main as cli_main


def test_defaults_yaml_then_dotlist(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  steps: 7\n  lr: 1.0e-4\ndata:\n  seq_len: 256\n")
    cfg = load_config(y, ["train.steps=9", "model.rope_scaling.type=yarn", "model.rope_scaling.factor=4"])
    assert isinstance(cfg, RunConfig)
    assert cfg.train.steps == 9  # dotlist wins over YAML
    assert cfg.train.lr == 1e-4  # YAML wins over defaults
    assert cfg.data.seq_len == 256
    assert cfg.model.rope_scaling.type == "yarn" and cfg.model.rope_scaling.factor == 4.0
    assert cfg.data.batch_size == RunConfig().data.batch_size  # untouched default
    assert "steps: 9" in to_yaml(cfg)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.stpes=3", "did you mean train.steps"),
        ("trian.steps=3", "unknown config key 'trian'"),
        ("train.steps=abc", "train.steps"),
        ("train.nan_policy=ignore", "train.nan_policy='ignore' is not one of stop, skip"),
        ("train.zero_stage=4", "train.zero_stage=4 must be 0, 1, 2 or 3"),
        ("train.offload_optimizer=true", "needs train.zero_stage >= 1"),
        ("parallel.strategy=magic", "parallel.strategy"),
        ("data.seq_len=0", "data.seq_len=0 must be > 0"),
        ("model.rope_scaling.type=yarn", None),  # valid on its own (factor defaults to 1)
        ("eval.passkey_depths=[0.5,1.5]", "eval.passkey_depths value 1.5"),
        ("stepsonly", "key.sub=value"),
    ],
)
def test_bad_values_name_the_field(override, needle):
    if needle is None:
        load_config(None, [override])
        return
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)


def test_yaml_typo_names_file_and_key(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("train:\n  step: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(y)
    assert "train.step" in str(e.value) and "bad.yaml" in str(e.value) and "train.steps" in str(e.value)


def test_missing_yaml():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/x.yaml")


def test_cli_reports_config_errors_without_traceback(capsys):
    rc = cli_main(["train", "train.stpes=3"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "config error" in err and "train.steps" in err and "Traceback" not in err


def test_cli_unknown_bundled_config(capsys):
    rc = cli_main(["train", "no_such_recipe"])
    assert rc == 2
    assert "demo" in capsys.readouterr().err  # lists the bundled names

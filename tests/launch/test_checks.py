"""Pre-flight checks that need the model (parallel.* vs the world: tests/dist/test_cp_trainer.py)."""

import pytest

from longreach.launch.checks import check_lengths
from longreach.launch.config import ConfigError, load_config


def test_seq_len_beyond_context_names_field_and_fix():
    cfg = load_config(None, ["data.seq_len=16384"])
    with pytest.raises(ConfigError) as e:
        check_lengths(cfg, 8192)
    msg = str(e.value)
    assert "data.seq_len=16384" in msg and "model.rope_scaling" in msg


def test_eval_lengths_beyond_context():
    cfg = load_config(None, ["data.seq_len=1024", "eval.passkey_lengths=[1024,9000]"])
    with pytest.raises(ConfigError, match=r"eval.passkey_lengths has lengths \[9000\]"):
        check_lengths(cfg, 8192)
    check_lengths(load_config(None, ["data.seq_len=8192"]), 8192)  # exactly the context is fine


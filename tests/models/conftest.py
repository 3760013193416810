"""Session fixtures for model I/O tests: the embedded SmolLM2 converted once per session."""

from __future__ import annotations

import os

import pytest
import torch

from longreach.launch.config import ModelConfig


@pytest.fixture(scope="session")
def smol_cache(tmp_path_factory):
    """Cache dir holding the embedded SmolLM2 converted once for the session (~25 s of dequantisation)."""
    from longreach.models.gguf import convert_cached, embedded_path

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    cache = tmp_path_factory.mktemp("lr_cache")
    convert_cached(embedded_path("embedded:smollm2-135m"), cache)
    return cache


@pytest.fixture(scope="session")
def smol(smol_cache):
    """(model, tokenizer) of the embedded SmolLM2, fp32 on CPU, from the session cache."""
    from longreach.models import load_model

    return load_model(ModelConfig(), cache_dir=smol_cache)

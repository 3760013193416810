"""Model I/O: load (HF safetensors directory, GGUF, embedded), save, attention plan, RoPE scaling."""

from .load import load_model
from .rope import apply_rope_scaling
from .save import save_pretrained
from .swap import attention_plan

__all__ = ["load_model", "save_pretrained", "attention_plan", "apply_rope_scaling"]

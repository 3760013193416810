"""longreach: long-context training for pretrained LLMs."""

__version__ = "0.1.0"

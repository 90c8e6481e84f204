"""localization-heads: training-free visual grounding with the localization heads of a vision-language model.

    from localization_heads import Grounder
    r = Grounder.from_pretrained("toy").ground("image.png", "the red circle .")

Importing the package loads nothing heavy and changes no global state: the public names below are
imported on first use (PEP 562). docs/api.md describes them; the CLI is `localization-heads`.
"""
from __future__ import annotations

import importlib

__version__ = "0.2.0"

# public name → module that defines it
_PUBLIC = {
    "Grounder": "localization_heads.api",
    "GroundingResult": "localization_heads.api",
    "compose_settings": "localization_heads.api",
    "load_attention": "localization_heads.api",
    "analyze_record": "localization_heads.api",
    "select_heads": "localization_heads.api",
    "Layout": "localization_heads.layout",
    "Settings": "localization_heads.config",
    "LogicSettings": "localization_heads.config",
    "ModelSettings": "localization_heads.config",
    "DataSettings": "localization_heads.config",
    "InputError": "localization_heads.dataio",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'localization_heads' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)

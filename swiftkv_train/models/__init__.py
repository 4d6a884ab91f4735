"""Loading models (local dirs, the Hub, GGUF, named and random presets); the methods' model classes live in
``swiftkv_train.methods.<name>.remote_code``."""

from .loading import load_pretrained

__all__ = ["load_pretrained"]

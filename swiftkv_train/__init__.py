"""swiftkv_train: convert Llama checkpoints into inference-efficient variants and distill them."""

from .errors import SwiftKVInputError

__version__ = "0.1.0"
__all__ = ["SwiftKVInputError", "__version__"]

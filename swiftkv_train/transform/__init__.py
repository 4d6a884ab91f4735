"""Model transformations: each builds the student from a Llama-family model."""

from .swiftkv import swiftkv_config, swiftkv_parameters, to_swiftkv

__all__ = ["swiftkv_config", "swiftkv_parameters", "to_swiftkv"]

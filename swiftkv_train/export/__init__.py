"""Exports: Hugging Face directories that load with trust_remote_code."""

from .hf import iter_state_tensors, save_hf

__all__ = ["iter_state_tensors", "save_hf"]

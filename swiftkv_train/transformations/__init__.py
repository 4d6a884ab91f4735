"""Transformations the shared trainer can run, by name (``transform.name`` in a recipe)."""

from ..errors import SwiftKVInputError
from .base import Transformation
from .cskv import CSKVTransformation
from .locret import LocretTransformation
from .swiftkv import SwiftKVTransformation

TRANSFORMATIONS: dict[str, type[Transformation]] = {
    SwiftKVTransformation.name: SwiftKVTransformation,
    CSKVTransformation.name: CSKVTransformation,
    LocretTransformation.name: LocretTransformation,
}


def build_transformation(transform_cfg, run_cfg=None) -> Transformation:
    """The transformation named by ``transform_cfg.name``, given its own config section."""
    name = transform_cfg.name
    if name not in TRANSFORMATIONS:
        raise SwiftKVInputError(f"transform.name={name!r} is unknown: use one of {', '.join(sorted(TRANSFORMATIONS))}.")
    return TRANSFORMATIONS[name](getattr(transform_cfg, name), run_cfg)


__all__ = ["TRANSFORMATIONS", "Transformation", "build_transformation"]

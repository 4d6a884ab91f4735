"""The methods the shared trainer can run, by name (``transform.name`` in a recipe).

Each subpackage of this folder is one method; importing this package imports every one of them, and each
registers itself by declaring its ``Method`` subclass (see base.py). A new method is a new folder: nothing here or
in any other shared file names one.
"""

import dataclasses
import importlib
import pkgutil

from ..errors import SwiftKVInputError
from .base import METHODS, Method, config_from_node, method_of, method_of_config, unwrap


def _import_all() -> None:
    for module in pkgutil.iter_modules(__path__):
        if module.ispkg:
            importlib.import_module(f"{__name__}.{module.name}")


_import_all()


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise SwiftKVInputError(f"transform.name={name!r} is unknown: use one of {', '.join(sorted(METHODS))}.")
    return METHODS[name]


def build_method(transform_cfg, run_cfg=None) -> Method:
    """The method named by ``transform_cfg.name``, given its own config section (``transform.<name>``)."""
    method = get_method(transform_cfg.name)
    return method(getattr(transform_cfg, method.name, None), run_cfg)


def transform_schema(name_default: str | None) -> type:
    """The ``transform`` config node: ``name`` (which method) and one section per registered method, typed by the
    method's own Config dataclass. Built from the registry, so a new method needs no edit to any config file.
    ``name_default``: OmegaConf's MISSING ("???") where a method must be chosen, None where it is optional."""
    sections = [(name, method.Config, dataclasses.field(default_factory=method.Config))
                for name, method in sorted(METHODS.items())]
    name_type = str | None if name_default is None else str
    return dataclasses.make_dataclass("TransformConfig", [("name", name_type, dataclasses.field(default=name_default)),
                                                          *sections])


def mode_switch(model):
    """The switch between ``model`` as the student (True) and as the original model (False), or None."""
    method = method_of(model)
    return method.mode_switch(model) if method is not None else None


__all__ = ["METHODS", "Method", "build_method", "config_from_node", "get_method", "method_of", "method_of_config", "mode_switch",
           "transform_schema",
           "unwrap"]

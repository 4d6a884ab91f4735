"""What the exports ship for ``trust_remote_code``: each method's model package declares its files explicitly.

An export directory is flat: the model package's own files, the shared files of this folder
(``transformers_compat.py``, the KV quantizer) and the Triton kernel files from ``swiftkv_kernels`` that the
model imports relatively (``from .name import ...``). Each method's ``remote_code/__init__.py`` lists them in a
``RemoteCode``; the export copies exactly those (tests/test_export.py checks that every relative import of a
shipped file is shipped too). Nothing here is imported by the shipped files.
"""

from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass
from pathlib import Path

COMMON_DIR = Path(__file__).resolve().parent
# `kernels/` of a source checkout, for when `swiftkv_kernels` is not installed (PYTHONPATH=$PWD runs).
_REPO_KERNELS = COMMON_DIR.parents[1] / "kernels"


def kernels_dir() -> Path:
    try:
        spec = importlib.util.find_spec("swiftkv_kernels")
    except ImportError:
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return _REPO_KERNELS


@dataclass(frozen=True)
class RemoteCode:
    """One method's model classes (config, base model, causal LM) and the files its exports ship: ``own`` (beside
    the classes' files), ``common`` (this folder) and ``kernels`` (swiftkv_kernels), by file name. The auto_map of
    an export names the classes by the file that defines them."""

    classes: tuple[type, type, type]
    own: tuple[str, ...]
    common: tuple[str, ...] = ()
    kernels: tuple[str, ...] = ()
    # The same model made from the other source families (Qwen2, Qwen3): their classes, defined in the same files.
    variants: tuple[tuple[type, type, type], ...] = ()

    @property
    def all_classes(self) -> tuple[tuple[type, type, type], ...]:
        return (self.classes, *self.variants)

    def classes_for(self, family: str) -> tuple[type, type, type] | None:
        """The (config, base model, causal LM) classes of the model made from a ``family`` source, or None."""
        return next((c for c in self.all_classes if getattr(c[0], "source_family", "llama") == family), None)

    @property
    def package_dir(self) -> Path:
        return Path(inspect.getfile(self.classes[0])).resolve().parent

    def sources(self) -> dict[str, Path]:
        """Shipped file name -> the file to copy."""
        found = {name: self.package_dir / name for name in self.own}
        found.update({name: COMMON_DIR / name for name in self.common})
        found.update({name: kernels_dir() / name for name in self.kernels})
        missing = [str(path) for path in found.values() if not path.is_file()]
        if missing:
            raise FileNotFoundError(f"remote code files missing: {', '.join(missing)}")
        return found

    def auto_map(self, model_type: str | None = None) -> dict[str, str]:
        """The auto_map of an export of ``model_type`` (default: the Llama model's)."""
        config_class, _, causal_class = next((c for c in self.all_classes if c[0].model_type == model_type),
                                             self.classes)
        return {"AutoConfig": _entry(config_class), "AutoModelForCausalLM": _entry(causal_class)}


def _entry(cls: type) -> str:
    """``module.Class`` as an export's auto_map names it (the module is the shipped file's name)."""
    return f"{Path(inspect.getfile(cls)).stem}.{cls.__name__}"


__all__ = ["COMMON_DIR", "RemoteCode", "kernels_dir"]

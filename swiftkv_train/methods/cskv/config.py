"""CSKV's settings (``transform.cskv`` in a recipe): one dataclass, its own checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...errors import SwiftKVInputError

INITS = ("svd", "asvd")


@dataclass
class CSKVConfig:
    """Settings of the CSKV transformation (``cfg.transform.cskv``).

    Densities are the share of the ``kv_dim`` channels kept (rank = round(density · kv_dim)); the ``*_per_layer``
    lists, when given, override the scalar for every layer. SmolLM2's values are far less compressible than its keys
    (see docs/smollm2_facts.md), hence the recipes set a higher value density there.
    """

    key_density: float = 0.5
    value_density: float = 0.5
    key_density_per_layer: list[float] | None = None
    value_density_per_layer: list[float] | None = None
    window: int = 32
    quant_bits: int | None = None
    quant_group_size: int = 32
    init: str = "asvd"
    asvd_alpha: float = 0.5
    calibration_batches: int = 8
    calibration_cache_dir: str = ""
    fake_quant: bool = False
    kl_weight: float = 0.0
    kl_temperature: float = 2.0

    # Settings that moved out of this section (the config check names the new place).
    MOVED: ClassVar[dict[str, str]] = {"kl_chunk_size": "trainer.loss_chunk_size"}

    def validate(self) -> None:
        for name in ("key_density", "value_density"):
            _check_density(name, getattr(self, name))
            per_layer = getattr(self, f"{name}_per_layer")
            if per_layer is not None:
                if not isinstance(per_layer, (list, tuple)) or not per_layer:
                    raise SwiftKVInputError(f"{name}_per_layer={per_layer!r} must be a non-empty list of floats or null.")
                for i, value in enumerate(per_layer):
                    _check_density(f"{name}_per_layer[{i}]", value)
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise SwiftKVInputError(f"window={self.window!r} is invalid: the full-precision window needs at least 1 "
                                    "token (the paper uses 32).")
        if self.quant_bits is not None and (isinstance(self.quant_bits, bool) or self.quant_bits not in (2, 4, 8)):
            raise SwiftKVInputError(f"quant_bits={self.quant_bits!r} is not supported: use null (no quantization), "
                                    "2, 4 or 8.")
        if isinstance(self.quant_group_size, bool) or not isinstance(self.quant_group_size, int) \
                or self.quant_group_size < 1:
            raise SwiftKVInputError(f"quant_group_size={self.quant_group_size!r} must be a positive integer (e.g. 32).")
        if self.init not in INITS:
            raise SwiftKVInputError(f"init={self.init!r} is unknown: use one of {INITS}.")
        if not self.asvd_alpha >= 0:
            raise SwiftKVInputError(f"asvd_alpha={self.asvd_alpha!r} must be >= 0 (0.5 in the paper).")
        if isinstance(self.calibration_batches, bool) or not isinstance(self.calibration_batches, int) \
                or self.calibration_batches < 1:
            raise SwiftKVInputError(f"calibration_batches={self.calibration_batches!r} must be a positive integer.")
        if not self.kl_weight >= 0:
            raise SwiftKVInputError(f"kl_weight={self.kl_weight!r} must be >= 0 (0 disables the KL term).")
        if not self.kl_temperature > 0:
            raise SwiftKVInputError(f"kl_temperature={self.kl_temperature!r} must be > 0.")
        if self.fake_quant and self.quant_bits is None:
            raise SwiftKVInputError("fake_quant=true needs quant_bits (2, 4 or 8): there is no quantization to simulate.")

    def densities(self, kind: str, num_layers: int) -> float | list[float]:
        """The model-config value for ``kind`` ("key"/"value"): the per-layer list if given, else the scalar."""
        per_layer = getattr(self, f"{kind}_density_per_layer")
        if per_layer is None:
            return float(getattr(self, f"{kind}_density"))
        if len(per_layer) != num_layers:
            raise SwiftKVInputError(
                f"{kind}_density_per_layer has {len(per_layer)} entries but the model has {num_layers} layers."
            )
        return [float(v) for v in per_layer]


def _check_density(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise SwiftKVInputError(
            f"{name}={value!r} is out of range: a density is the share of K/V channels kept, in (0, 1] "
            "(e.g. 0.2 keeps 20%, an 80% smaller cache)."
        )

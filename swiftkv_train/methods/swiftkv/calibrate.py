"""Least-squares initialisation of the SwiftKV K/V projections from calibration data.

The reference initialises each later layer's ``k/v_proj_swiftkv`` with that layer's own ``k/v_proj`` (the mean over
an AcrossKV group), although the projection now reads ``norm_swiftkv(h_M)`` instead of the layer's own normed input.
Here each group's projection is instead the ridge-regression fit of what the teacher's projections produce:

    W = argmin_W  mean_{j in group} || X W^T - Y_j ||^2 + lam ||W||^2,   X = norm_swiftkv(h_M),  Y_j = k_proj_j(Z_j)

with ``Z_j`` layer j's own normed input, over the calibration tokens. Pre-RoPE keys are the right target: RoPE
rotates each position by an orthogonal map, so it leaves the squared error unchanged. The statistics are
``X^T X`` and ``X^T Y_j`` (accumulated in float64, summed over ranks), so memory does not grow with the data.
"""

import logging
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ...errors import SwiftKVInputError

log = logging.getLogger(__name__)


@dataclass
class KVFitReport:
    """What the fit achieved: per AcrossKV group leader, the share of the target's energy left unexplained by the
    reference initialisation and by the fit (on the calibration tokens)."""

    tokens: int = 0
    unexplained_before: dict[int, float] = field(default_factory=dict)
    unexplained_after: dict[int, float] = field(default_factory=dict)

    def summary(self) -> str:
        before = sum(self.unexplained_before.values()) / max(1, len(self.unexplained_before))
        after = sum(self.unexplained_after.values()) / max(1, len(self.unexplained_after))
        return f"{self.tokens} tokens, unexplained K/V energy {before:.3f} (reference init) -> {after:.3f} (fit)"


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


class _Statistics:
    """Running sums over calibration tokens: X^T X, and per group leader and kind (k, v) X^T Y and ||Y||^2."""

    def __init__(self, hidden: int, device):
        self.xtx = torch.zeros(hidden, hidden, dtype=torch.float64, device=device)
        self.xty: dict[tuple[int, str], torch.Tensor] = {}
        self.yy: dict[tuple[int, str], torch.Tensor] = {}
        self.tokens = torch.zeros((), dtype=torch.float64, device=device)

    def add_input(self, x: torch.Tensor) -> None:
        x = x.double()
        self.xtx += x.T @ x
        self.tokens += x.shape[0]

    def add_target(self, key: tuple[int, str], x: torch.Tensor, y: torch.Tensor) -> None:
        y = y.double()
        xty = x.double().T @ y
        yy = y.pow(2).sum()
        if key in self.xty:
            self.xty[key] += xty
            self.yy[key] += yy
        else:
            self.xty[key], self.yy[key] = xty, yy

    def reduce(self) -> None:
        for tensor in [self.xtx, self.tokens, *self.xty.values(), *self.yy.values()]:
            _all_reduce(tensor)


def _decoder_input(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@torch.no_grad()
def collect_kv_statistics(model, batches) -> _Statistics:
    """Run the teacher (SwiftKV off) over ``batches``; sum X^T X and every later layer's X^T Y_j (k and v).

    Tokens where ``attention_mask`` is 0 (padding) are left out."""
    config = model.config
    m, layers = config.num_key_value_layers, config.num_hidden_layers
    inner = model.model
    stats = _Statistics(config.hidden_size, inner.norm_swiftkv.weight.device)
    state: dict = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        flat = t.reshape(-1, t.shape[-1])
        return flat if state["mask"] is None else flat[state["mask"]]

    def on_layer_m(module, args, kwargs):
        state["x"] = keep(inner.norm_swiftkv(_decoder_input(args, kwargs)))
        stats.add_input(state["x"])

    def on_projection(leader: int, kind: str):
        def hook(module, args, output):
            stats.add_target((leader, kind), state["x"], keep(output))
        return hook

    handles = [inner.layers[m].register_forward_pre_hook(on_layer_m, with_kwargs=True)]
    for idx in range(m, layers):
        attn = inner.layers[idx].self_attn
        leader = config.swiftkv_group_leader(idx)
        handles.append(attn.k_proj.register_forward_hook(on_projection(leader, "k")))
        handles.append(attn.v_proj.register_forward_hook(on_projection(leader, "v")))
    was_on = config.swiftkv
    model.swiftkv(False)
    try:
        for batch in batches:
            mask = batch.get("attention_mask")
            state["mask"] = mask.reshape(-1).bool() if mask is not None else None
            inputs = {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask") if batch.get(k) is not None}
            inner(**inputs, use_cache=False)  # the later layers are the last ones: every layer's input is needed
    finally:
        model.swiftkv(was_on)
        for handle in handles:
            handle.remove()
    stats.reduce()
    if stats.tokens.item() == 0:
        raise SwiftKVInputError("the SwiftKV calibration batches hold no (non-padding) tokens.")
    return stats


def _unexplained(w: torch.Tensor, xtx: torch.Tensor, xty: torch.Tensor, yy: torch.Tensor) -> float:
    """||X W^T - Y||^2 / ||Y||^2 from the sums (W: [out, hidden], float64)."""
    residual = (w @ xtx * w).sum() - 2 * (w * xty.T).sum() + yy
    return float(residual.clamp_min(0) / yy.clamp_min(1e-30))


@torch.no_grad()
def least_squares_kv_init(model, batches, ridge: float = 1e-4) -> KVFitReport:
    """Set every AcrossKV group's ``k/v_proj_swiftkv`` to the ridge fit described in the module docstring.

    ``ridge`` is relative: lam = ridge * trace(X^T X) / hidden. ``norm_swiftkv`` and the query projections are not
    changed. Raises for projections with a bias (the fit has no intercept)."""
    config = model.config
    m, layers, g = config.num_key_value_layers, config.num_hidden_layers, config.key_value_group_size
    if m >= layers:
        return KVFitReport()
    if model.model.layers[m].self_attn.k_proj_swiftkv.bias is not None:  # (Llama attention_bias, Qwen2)
        raise SwiftKVInputError(
            "transform.swiftkv.kv_init=least_squares fits projections without a bias; this model's attention has "
            "biases: use kv_init=mean."
        )
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or ridge < 0:
        raise SwiftKVInputError(f"transform.swiftkv.kv_init_ridge={ridge!r} must be a number >= 0 (e.g. 1e-4).")
    stats = collect_kv_statistics(model, batches)
    hidden = config.hidden_size
    lam = ridge * stats.xtx.diagonal().sum() / hidden
    system = stats.xtx + lam * torch.eye(hidden, dtype=torch.float64, device=stats.xtx.device)
    factor = torch.linalg.cholesky(system)
    report = KVFitReport(tokens=int(stats.tokens.item()))
    for leader in range(m, layers, g):
        size = min(g, layers - leader)
        attn = model.model.layers[leader].self_attn
        before, after = [], []
        for kind in ("k", "v"):
            xty = stats.xty[(leader, kind)] / size  # X^T of the group's mean target
            yy = stats.yy[(leader, kind)] / size  # mean over the group of ||Y_j||^2
            param = getattr(attn, f"{kind}_proj_swiftkv").weight
            before.append(_unexplained(param.double(), stats.xtx, xty, yy))
            fitted = torch.cholesky_solve(xty, factor).T  # [out, hidden]
            after.append(_unexplained(fitted, stats.xtx, xty, yy))
            param.copy_(fitted.to(param.dtype))
        report.unexplained_before[leader] = sum(before) / 2
        report.unexplained_after[leader] = sum(after) / 2
    log.info("SwiftKV least-squares K/V init: %s", report.summary())
    return report

"""Export a transformed model as a self-contained Hugging Face directory (``trust_remote_code``).

The directory holds config (with ``auto_map``), the model's own ``configuration_*.py``/``modeling_*.py`` (and
their sibling files), the weights in safetensors (one ``model.safetensors`` when they fit in ``max_shard_bytes``,
else ``model-0000i-of-0000n.safetensors`` shards and ``model.safetensors.index.json``, the layout
``save_pretrained`` writes), the tokenizer with its chat template, and the generation config. It is written to a
temporary sibling and renamed into place, so a crash never leaves a half-written export under the final name.
Under ZeRO-3, parameters are gathered one at a time.
"""

import copy
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..zero import gathered

log = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 2 * 1024**3


def iter_state_tensors(model: torch.nn.Module, skip: set[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor on CPU) for every parameter and persistent buffer, one at a time.

    Tied parameters are yielded once (under their first name). Every rank must run this loop under ZeRO-3
    (the gather is collective); only the writer keeps the tensors.
    """
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if name in skip or id(param) in seen:
            continue
        seen.add(id(param))
        with gathered(param):
            yield name, param.detach().to("cpu", copy=True)
    non_persistent = {
        f"{mod_name}.{buf}".lstrip(".")
        for mod_name, mod in model.named_modules()
        for buf in getattr(mod, "_non_persistent_buffers_set", ())
    }
    for name, buf in model.named_buffers():
        if name not in non_persistent and name not in skip:
            yield name, buf.detach().to("cpu", copy=True)


def _new_file_mode() -> int:
    """The mode an ordinary new file gets under the current umask (os has no umask getter: set it back at once)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


class ShardWriter:
    """Writes tensors into size-bounded safetensors shards as they arrive, then names them and the index.

    One shard is named ``model.safetensors`` (no index), several ``model-0000i-of-0000n.safetensors`` with
    ``model.safetensors.index.json``: the layout ``save_pretrained`` writes and ``from_pretrained`` expects.
    """

    def __init__(self, out_dir: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.out_dir, self.max_bytes = out_dir, max_shard_bytes
        self.mode = _new_file_mode()
        self.current: dict[str, torch.Tensor] = {}
        self.current_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.current and self.current_bytes + size > self.max_bytes:
            self._flush()
        self.current[name] = tensor.contiguous()
        self.current_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.out_dir / f"shard-{len(self.shards)}.tmp"
        save_file(self.current, str(path), metadata={"format": "pt"})
        # safetensors writes through a private (0600) temporary file and that mode survives the renames: without
        # this, nobody but the writer could read the weights of a shared export.
        os.chmod(path, self.mode)
        self.shards.append((path, list(self.current)))
        self.current, self.current_bytes = {}, 0

    def close(self) -> None:
        if self.current or not self.shards:
            self._flush()
        if len(self.shards) == 1:
            self.shards[0][0].rename(self.out_dir / "model.safetensors")
            return
        weight_map = {}
        for i, (path, names) in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{len(self.shards):05d}.safetensors"
            path.rename(self.out_dir / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


class _SourceCheckpoint:
    """Tensors of a Hugging Face directory's safetensors (one file or an index), read lazily by name."""

    def __init__(self, directory: str | os.PathLike):
        directory = Path(directory)
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: directory / file for name, file in weight_map.items()}
        else:
            self.files = {}
            for path in sorted(directory.glob("*.safetensors")):
                with safe_open(str(path), "pt") as f:
                    self.files.update(dict.fromkeys(f.keys(), path))
        if not self.files:
            raise FileNotFoundError(f"frozen_source {str(directory)!r} holds no safetensors weights")
        self._stack = ExitStack()
        self._open: dict[Path, object] = {}

    def get(self, name: str) -> torch.Tensor | None:
        path = self.files.get(name)
        if path is None:
            return None
        if path not in self._open:
            self._open[path] = self._stack.enter_context(safe_open(str(path), "pt"))
        return self._open[path].get_tensor(name)

    def close(self) -> None:
        self._stack.close()


def _copy_model_code(model: torch.nn.Module, out_dir: Path) -> dict[str, str]:
    """Copy the files the model's method declares for its exports (its ``RemoteCode``) and return the auto_map."""
    from ..methods import method_of  # late: the methods import the loader, which imports this module

    method = method_of(model)
    if method is None or method.remote_code is None:
        raise ValueError(
            f"{type(model).__name__} (model_type {getattr(model.config, 'model_type', None)!r}) is not a model of a "
            "registered method: only their exports ship remote code"
        )
    for name, source in method.remote_code.sources().items():
        shutil.copyfile(source, out_dir / name)  # a new file: mode from the umask, not the source
    return method.remote_code.auto_map(model.config.model_type)


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move ``tmp`` to ``out_dir``; an existing export is replaced only once the new one is complete."""
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def save_hf(
    model: torch.nn.Module,
    tokenizer,
    out_dir: str | os.PathLike,
    lean: bool = True,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    model_card: str | None = None,
    is_writer: bool = True,
    frozen_source: str | os.PathLike | None = None,
) -> Path:
    """Write ``model`` (+ tokenizer) as a directory loadable with ``from_pretrained(..., trust_remote_code=True)``.

    ``lean=True`` drops the weights only the teacher uses (the model says which, via ``lean_export_spec``) and
    stores bf16; ``lean=False`` keeps every weight in the model's dtype (resumable, teacher still available).
    Under ZeRO-3 call it on every rank with ``is_writer = (rank == 0)``.

    ``frozen_source`` is the Hugging Face directory the model was loaded from. Each frozen (non-trainable) tensor
    the model still holds unchanged, i.e. equal to the source's tensor rounded to the model's dtype, is written
    byte-for-byte from the source: a model trained in bf16 holds rounded copies of the original weights, and a
    full export must keep the original (teacher) model exact. ``config.dtype`` of a full export is then the
    widest stored dtype, so ``dtype="auto"`` loads every weight exactly.
    """
    out_dir = Path(out_dir)
    drop: set[str] = set()
    config = copy.deepcopy(model.config)
    if lean and hasattr(model, "lean_export_spec"):
        drop, config_updates = model.lean_export_spec()
        for key, value in config_updates.items():
            setattr(config, key, value)
    dtype = torch.bfloat16 if lean else None
    if getattr(config, "tie_word_embeddings", False):
        drop = drop | {"lm_head.weight"}

    tmp = None
    if is_writer:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.mkdir()
    trainable = {name for name, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    source, restored, stored_dtypes = None, 0, set()
    try:
        if is_writer and frozen_source is not None:
            source = _SourceCheckpoint(frozen_source)
        writer = ShardWriter(tmp, max_shard_bytes) if is_writer else None
        for name, tensor in iter_state_tensors(model, skip=drop):
            if writer is None:
                continue
            if source is not None and name not in trainable:
                original = source.get(name)
                # a frozen tensor the transformation rewrote (or a name the source lacks) is the model's to write
                if (original is not None and original.shape == tensor.shape
                        and torch.equal(original.to(tensor.dtype), tensor)):
                    tensor, restored = original, restored + 1
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            if tensor.is_floating_point():
                stored_dtypes.add(tensor.dtype)
            writer.add(name, tensor)
        if not is_writer:
            return out_dir
        writer.close()
        if source is not None:
            log.info("%s: %d frozen tensors written as stored in %s", out_dir, restored, frozen_source)
        if dtype is None and stored_dtypes:
            dtype = max(stored_dtypes, key=lambda d: torch.finfo(d).bits)
        if not type(model).__module__.startswith("transformers."):  # our own classes travel with the weights
            config.auto_map = _copy_model_code(model, tmp)
        config.architectures = [type(model).__name__]
        if dtype is not None:
            config.dtype = dtype
        config.save_pretrained(tmp)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if model_card is not None:
            (tmp / "README.md").write_text(model_card)
        _replace_dir(tmp, out_dir)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if source is not None:
            source.close()
    return out_dir

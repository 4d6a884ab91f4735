"""Tiny random Llama (and Qwen2 / Qwen3) models and a byte-level ChatML tokenizer for tests and examples (no
downloads)."""

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM,
                          Qwen3Config, Qwen3ForCausalLM)

from ..errors import SwiftKVInputError

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# The ChatML template SmolLM2 ships, reduced to what the tests need.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# A preset's "model_type" (default llama) picks the family: its transformers config and model classes.
FAMILY_CLASSES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
                  "qwen3": (Qwen3Config, Qwen3ForCausalLM)}

# name -> config fields. All share the tokenizer's 259-token vocabulary (padded to 320).
PRESETS: dict[str, dict] = {
    # 4 layers, GQA 4:2: the default for unit tests.
    "tiny": dict(num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2),
    # 7 layers so that M=2 leaves 5 later layers: ragged AcrossKV groups (g=2, g=3).
    "tiny-7l": dict(num_hidden_layers=7, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                    num_key_value_heads=2),
    # Multi-head attention (no GQA), untied head.
    "tiny-mha": dict(num_hidden_layers=4, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                     num_key_value_heads=4, tie_word_embeddings=False),
    # SmolLM2's proportions (9 heads, 3 KV heads, tied embeddings), shrunk.
    "smollm2-tiny": dict(num_hidden_layers=6, hidden_size=72, intermediate_size=192, num_attention_heads=9,
                         num_key_value_heads=3, tie_word_embeddings=True),
    # "tiny" as Qwen2 (q/k/v biases) and Qwen3 (per-head q/k norms, head_dim set apart from hidden/heads).
    "tiny-qwen2": dict(model_type="qwen2", num_hidden_layers=4, hidden_size=64, intermediate_size=128,
                       num_attention_heads=4, num_key_value_heads=2),
    "tiny-qwen3": dict(model_type="qwen3", num_hidden_layers=4, hidden_size=64, intermediate_size=128,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16),
}
# Real model shapes with random weights, for speed and memory benchmarks (build them on the GPU: device="cuda").
SHAPE_PRESETS: dict[str, dict] = {
    "llama3.1-8b-shape": dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336,
                              num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                              max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=False),
    # 70B layers, 24 of them (~23B parameters): the 70B recipe's per-layer work on 1-2 GPUs.
    "llama3.1-70b-shape-24l": dict(num_hidden_layers=24, hidden_size=8192, intermediate_size=28672,
                                   num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                                   max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=False),
    "llama3.1-70b-shape": dict(num_hidden_layers=80, hidden_size=8192, intermediate_size=28672,
                               num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                               max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=False),
    # Qwen2.5-7B-Instruct (config.json of the release: q/k/v biases, no sliding window).
    "qwen2.5-7b-shape": dict(model_type="qwen2", num_hidden_layers=28, hidden_size=3584, intermediate_size=18944,
                             num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                             max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                             tie_word_embeddings=False),
}


def _byte_level_chars() -> list[str]:
    """The printable character ByteLevel uses for each byte value 0..255, in byte order (token id = byte value).

    Printable Latin-1 bytes stand for themselves; the others are shifted past 255, as the ByteLevel
    pre-tokenizer does. Built in byte order so that ids are the same in every process.
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), 256))
    chars, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + shifted))
            shifted += 1
    assert set(chars) == set(pre_tokenizers.ByteLevel.alphabet())
    return chars


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens + ChatML specials) with a chat template."""
    byte_vocab = {ch: byte for byte, ch in enumerate(_byte_level_chars())}
    for tok in SPECIAL_TOKENS:
        byte_vocab[tok] = len(byte_vocab)
    tok = Tokenizer(models.BPE(vocab=byte_vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def random_config(preset: str, **overrides):
    presets = {**PRESETS, **SHAPE_PRESETS}
    if preset not in presets:
        raise SwiftKVInputError(
            f"unknown random preset {preset!r}: use one of {', '.join('random:' + p for p in presets)}."
        )
    tok_ids = {t: 256 + i for i, t in enumerate(SPECIAL_TOKENS)}
    fields = dict(
        vocab_size=320,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        pad_token_id=tok_ids["<|endoftext|>"],
        bos_token_id=tok_ids["<|im_start|>"],
        eos_token_id=tok_ids["<|im_end|>"],
    )
    fields.update(presets[preset])
    rope_theta = fields.pop("rope_theta", None)
    if rope_theta is not None:
        fields["rope_parameters"] = {"rope_type": "default", "rope_theta": rope_theta}
    fields.update(overrides)
    config_class, _ = FAMILY_CLASSES[fields.pop("model_type", "llama")]
    return config_class(**fields)


def random_model(preset: str, seed: int = 0, dtype=torch.float32, device=None, **overrides):
    """A randomly initialised LlamaForCausalLM (Qwen2/Qwen3ForCausalLM for those presets) with a slightly larger init
    so that layers matter.

    Real-shape presets are built directly on ``device`` in ``dtype`` (an 8B model in fp32 on the host would
    take 32 GB and minutes to initialise) with the standard 0.02 init.
    """
    big = preset in SHAPE_PRESETS
    config = random_config(preset, initializer_range=0.02 if big else 0.08, **overrides)
    config._attn_implementation = "sdpa"
    model_class = FAMILY_CLASSES[config.model_type][1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if big:
            with torch.device(device or "cpu"):
                default_dtype = torch.get_default_dtype()
                torch.set_default_dtype(dtype)
                try:
                    model = model_class(config)
                finally:
                    torch.set_default_dtype(default_dtype)
            return model.eval()
        model = model_class(config)
        # Random norms (and Qwen2's q/k/v biases, zero at init), so that copying the right ones is actually tested.
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                param.data.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                param.data.normal_(0.0, 0.1)
    return model.to(dtype=dtype, device=device).eval()

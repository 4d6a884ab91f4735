"""KV-cache policies: exactness with a large budget, the kept positions, and the scores against direct math; the
generic tests are parametrized from the registry (POLICIES), so a new policy is tested on arrival."""

import dataclasses
import subprocess
import sys
import typing

import pytest
import torch

from swiftkv_train.errors import SwiftKVInputError
from swiftkv_train.methods import METHODS
from swiftkv_train.models import load_pretrained
from swiftkv_train.models.tiny import random_model
from swiftkv_train.policies import (
    H2O,
    POLICIES,
    TOVA,
    AdaKV,
    BudgetAllocation,
    ExpectedAttention,
    Knorm,
    PyramidKV,
    Budget,
    BudgetedPolicy,
    CachePolicy,
    FullCache,
    Keyformer,
    LearnedScorePolicy,
    PolicyCache,
    SnapKV,
    StreamingLLM,
    SlotView,
    StepInfo,
    build_policy,
    greedy_generate,
    record_token_scores,
)
from swiftkv_train.policies import attention as policy_attention_mod
from swiftkv_train.policies.active import activated, active_cache
from swiftkv_train.policies.baselines import gumbel_noise, keyformer_noise_seed
from swiftkv_train.methods.swiftkv import to_swiftkv

from helpers import one_thread  # noqa: F401 - autouse: every test here runs on one thread


@pytest.fixture(scope="module")
def tiny():
    model, tok = load_pretrained("random:tiny")
    return model, tok


def prompt(batch=2, length=40, seed=0):
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_budget_parsing():
    assert Budget.parse("512") == Budget(tokens=512)
    assert Budget.parse("50%").resolve(100) == 50
    assert Budget.parse("0.25").resolve(100) == 25
    assert Budget.parse("4x").resolve(100) == 25
    assert Budget.parse(7).resolve(1000) == 7
    for bad in ("half", "0.5x", "0", "150%"):
        with pytest.raises(SwiftKVInputError, match="budget"):
            Budget.parse(bad)
    with pytest.raises(SwiftKVInputError, match="unknown cache policy 'nope'"):
        build_policy("nope")
    with pytest.raises(SwiftKVInputError, match="needs a budget"):
        H2O(None)


ALL_POLICIES = [
    lambda: FullCache(),
    lambda: StreamingLLM(200, sink_tokens=4),
    lambda: H2O(200),
    lambda: H2O(200, observation_window=3),
    lambda: Keyformer(200, seed=1),
    lambda: SnapKV(200),
    lambda: LearnedScorePolicy(200),
    lambda: TOVA(200),
    lambda: Knorm(200, evict_during_decode=True),
    lambda: ExpectedAttention(200),
    lambda: PyramidKV(200, inner="h2o"),
    lambda: AdaKV(200, inner="snapkv"),
    lambda: AdaKV(200, inner="tova", inner_settings={"head_average": "group"}),
]


@pytest.mark.parametrize("make", ALL_POLICIES, ids=["full", "streaming", "h2o", "h2o-window", "keyformer", "snapkv",
                                                    "learned", "tova", "knorm", "expected-attention", "pyramid-h2o",
                                                    "adakv-snapkv", "adakv-tova"])
def test_budget_at_least_sequence_reproduces_full_cache(tiny, make):
    model, _ = tiny
    ids = prompt()
    reference = greedy_generate(model, ids, 8, keep_logits=True)
    hf = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(hf[:, ids.shape[1]:], reference.tokens)  # our loop == transformers' generate
    for chunk in (None, 16):
        out = greedy_generate(model, ids, 8, policy=make(), keep_logits=True, prefill_chunk=chunk)
        assert torch.equal(out.tokens, reference.tokens)
        for a, b in zip(out.logits, reference.logits):
            assert torch.equal(a, b)
        assert out.cache.get_seq_length(0) == ids.shape[1] + 7


def test_swiftkv_acrosskv_model_with_policy_is_exact_and_evicts(tiny):
    model, _ = tiny
    student = to_swiftkv(model, 2, 2).eval()  # slots: 2 early layers + one AcrossKV group
    ids = prompt()
    reference = greedy_generate(student, ids, 6, keep_logits=True)
    out = greedy_generate(student, ids, 6, policy=H2O(100), keep_logits=True)
    assert torch.equal(out.tokens, reference.tokens)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, reference.logits))
    small = greedy_generate(student, ids, 6, policy=H2O(16))
    assert len(small.cache.layers) == 3
    assert all(layer.keys.shape[2] == 16 for layer in small.cache.layers)


def test_streaming_llm_keeps_sinks_and_recent_window(tiny):
    model, _ = tiny
    ids = prompt(length=30)
    out = greedy_generate(model, ids, 6, policy=StreamingLLM(10, sink_tokens=3))
    assert out.tokens_held_after_prefill == 10
    fed = 30 + 5  # the last generated token is never fed back
    expected = [0, 1, 2] + list(range(fed - 7, fed))
    for layer in out.cache.layers:
        assert layer.positions.shape == (2, 2, 10)
        assert (layer.positions == torch.tensor(expected, dtype=torch.int32)).all()


def test_eviction_equals_full_forward_with_the_eviction_mask(tiny):
    """Independent check of positions and masking after eviction: StreamingLLM decoding must equal one full
    forward over prompt + generated tokens where each generated token's row masks the evicted positions."""
    model, _ = tiny
    ids = prompt(batch=1, length=24)
    sinks, budget, new = 2, 9, 6
    out = greedy_generate(model, ids, new, policy=StreamingLLM(budget, sink_tokens=sinks), keep_logits=True)
    seq = torch.cat([ids, out.tokens[:, :-1]], dim=1)
    total = seq.shape[1]
    allowed = torch.tril(torch.ones(total, total, dtype=torch.bool))
    for row in range(24, total):  # decode rows: the cache held `budget` entries, then the row's own token
        held = set(range(sinks)) | set(range(row - (budget - sinks), row))
        allowed[row, :row] = torch.tensor([j in held for j in range(row)])
    logits = model(seq, attention_mask=allowed[None, None], use_cache=False).logits[0]
    for step in range(new):
        torch.testing.assert_close(out.logits[step][0], logits[23 + step], rtol=1e-4, atol=1e-4)


def test_h2o_scores_equal_eager_attention_column_sums():
    model, _ = load_pretrained("random:tiny", attn_implementation="eager")
    ids = prompt(batch=1, length=20)
    attentions = model(ids, output_attentions=True).attentions  # eager: [B, H_q, S, S] per layer
    model.set_attn_implementation("sdpa")
    out = greedy_generate(model, ids, 1, policy=H2O(64))  # no eviction; scores after the prompt
    for layer, probs in zip(out.cache.layers, attentions):
        expected = probs.reshape(1, 2, 2, 20, 20).sum(dim=(2, 3))  # query heads of each KV head, all rows
        torch.testing.assert_close(layer.scores, expected, rtol=1e-4, atol=1e-5)


def test_h2o_select_keeps_heavy_hitters_plus_recent():
    scores = torch.tensor([[[5.0, 0.1, 3.0, 0.2, 4.0, 0.3, 0.0, 9.0, 1.0, 2.0]]])
    view = SlotView(0, torch.zeros(1, 1, 10, 4), torch.zeros(1, 1, 10, 4), torch.arange(10).view(1, 1, 10), scores)
    policy = H2O(6, recent_share=0.5)
    policy.start(prompt_len=10, max_new_tokens=1)
    keep = policy.select(view, StepInfo(10, 1, seen=10))
    # recent 3 = entries 7, 8, 9; heavy 3 among 0..6 = 0 (5.0), 4 (4.0), 2 (3.0)
    assert keep.tolist() == [[[0, 2, 4, 7, 8, 9]]]
    assert policy.select(SlotView(0, *(t[..., :6, :] for t in (view.keys, view.values)), view.positions[..., :6],
                                  scores[..., :6]), StepInfo(6, 1)) is None


def _direct_keyformer(keys_by_step, steps, seed, tau_init, tau_end, max_new, scaling):
    """Accumulated Keyformer score written out plainly: sum over steps, heads and rows of
    softmax((QK^T*s + causal mask + Gumbel) / tau_t)."""
    total = None
    for t, (q, k) in enumerate(zip(steps, keys_by_step)):
        logits = torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(2, dim=1)) * scaling
        q_len, k_len = q.shape[2], k.shape[2]
        causal = torch.arange(k_len)[None, :] <= (torch.arange(q_len)[:, None] + k_len - q_len)
        logits = logits.masked_fill(~causal, float("-inf"))
        grouped = logits.reshape(1, 2, 2, q_len, k_len)
        generator = torch.Generator().manual_seed(keyformer_noise_seed(seed, 0, t, 0))
        u = torch.rand(grouped.shape, generator=generator).clamp(1e-10, 1 - 1e-7)
        tau = tau_init + t * (tau_end - tau_init) / max_new
        contrib = torch.softmax((grouped - torch.log(-torch.log(u))) / tau, dim=-1).sum(dim=(2, 3))
        if total is not None:  # earlier steps saw fewer keys: their contributions are zero on the new ones
            contrib = contrib + torch.nn.functional.pad(total, (0, contrib.shape[-1] - total.shape[-1]))
        total = contrib
    return total


def test_keyformer_score_accumulation_matches_direct_computation(tiny):
    model, _ = tiny
    attn = model.model.layers[0].self_attn  # a real module: 4 query heads, 2 KV heads, head dim 16
    gen = torch.Generator().manual_seed(0)
    prompt_len, max_new, seed = 6, 4, 3
    policy = Keyformer(budget=100, seed=seed)  # no eviction: pure accumulation
    cache = PolicyCache(policy, prompt_len, max_new)
    policy_attention_mod.register()
    queries, keys_seen = [], []
    with activated(cache):
        for step, q_len in enumerate([prompt_len, 1, 1, 1]):
            start = cache.step.seen
            cache.begin_step(torch.arange(start, start + q_len), decode_step=step)
            q = torch.randn(1, 4, q_len, 16, generator=gen)
            k_new, v_new = torch.randn(1, 2, q_len, 16, generator=gen), torch.randn(1, 2, q_len, 16, generator=gen)
            keys, values = cache.update(k_new, v_new, 0)
            mask = None if step == 0 else torch.ones(1, 1, 1, keys.shape[2], dtype=torch.bool)
            policy_attention_mod.policy_sdpa_attention(attn, q, keys, values, mask, scaling=0.25)
            cache.end_step()
            queries.append(q)
            keys_seen.append(keys.clone())
    expected = _direct_keyformer(keys_seen, queries, seed, 1.0, 2.0, max_new, 0.25)
    torch.testing.assert_close(cache.layers[0].scores, expected, rtol=1e-5, atol=1e-6)
    # The Gumbel draw is the standard one.
    noise = gumbel_noise((4,), 5, "cpu")
    u = torch.rand(4, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(noise, -torch.log(-torch.log(u)))


def test_keyformer_evicts_to_prompt_budget_with_recent_window(tiny):
    model, _ = tiny
    ids = prompt(batch=1, length=40)
    policy = Keyformer(budget="50%", recent_share=0.3, seed=0)
    out = greedy_generate(model, ids, 5, policy=policy)
    assert policy.capacity == 20 and policy.recent_tokens() == 6
    fed = 40 + 4
    for layer in out.cache.layers:
        assert layer.keys.shape[2] == 20
        assert (layer.positions[..., -6:] == torch.arange(fed - 6, fed, dtype=torch.int32)).all()


def test_learned_scores_pushed_by_the_model_decide_what_stays(tiny):
    """Locret-style: the model pushes one score per new token; here score = -(position - 10)^2 (peak at 10)."""
    model, _ = tiny

    def push(module, args, output):
        cache = active_cache()
        new = cache.step.new_tokens
        positions = torch.arange(cache.step.seen - new, cache.step.seen, dtype=torch.float32)
        record_token_scores(module, (-(positions - 10) ** 2).expand(1, 2, new))

    hooks = [layer.self_attn.register_forward_hook(push) for layer in model.model.layers]
    try:
        out = greedy_generate(model, prompt(batch=1, length=30), 3, policy=LearnedScorePolicy(7, stabilizers=2))
    finally:
        for hook in hooks:
            hook.remove()
    # After the prompt: 2 stabilizers (28, 29) + the 5 best-scored others (8..12); no eviction while decoding.
    expected = [8, 9, 10, 11, 12, 28, 29, 30, 31]
    for layer in out.cache.layers:
        assert layer.positions[0, 0].tolist() == expected


# ---------------------------------------------------------------------------------------- every registered policy

# Settings that shrink a policy's protected ends below its budget wherever it has them, so that "the protected
# entries are kept" is not the same as "everything is kept" (each is an ordinary setting of the policies that
# declare it: attention sinks, stabilizers, an observation window).
SMALL_PROTECTED = {"sink_tokens": 2, "stabilizers": 3, "observation_window": 4}
BUDGET = 12


def generic_policy(cls, inner: str | None = None) -> CachePolicy:
    """``cls`` with its own defaults, a budget if it takes one, and `SMALL_PROTECTED` where it has the setting (a
    budget wrapper: where its inner policy, ``inner`` or its default, has it)."""
    names = {f.name for f in cls.setting_fields()}
    settings = {k: v for k, v in SMALL_PROTECTED.items() if k in names}
    if "budget" in names:
        settings["budget"] = BUDGET
    if issubclass(cls, BudgetAllocation):
        inner = inner or cls.__dataclass_fields__["inner"].default
        inner_names = {f.name for f in POLICIES[inner].setting_fields()}
        settings.update(inner=inner, inner_settings={k: v for k, v in SMALL_PROTECTED.items() if k in inner_names})
    return cls(**settings)


_MODELS: list = []


def candidate_models():
    """Tiny random models a policy may run on: the plain one first, then each registered method's student of it
    (default settings), built on first use. A policy whose scores come from inside the model (``scores_from``)
    refuses the ones that cannot give them."""
    yield from _MODELS
    if not _MODELS:
        _MODELS.append(("plain", random_model("tiny", seed=0).eval()))
        yield _MODELS[-1]
    for name, method in sorted(METHODS.items()):
        if name not in dict(_MODELS):
            _MODELS.append((name, method(None).build_student(random_model("tiny", seed=0)).eval()))
            yield _MODELS[-1]


def model_for(policy: CachePolicy):
    for _, model in candidate_models():
        try:
            with policy.scores_from(model):
                return model
        except SwiftKVInputError:
            continue
    pytest.fail(f"no tiny model can feed policy {policy.name!r}")


def check_budget_and_protected(policy: CachePolicy, chunk):
    """Generate under ``policy`` and check, slot by slot and head by head, what it holds: its budget (per layer
    and head; a per-head-budget policy: the layer's total over its heads) and its protected oldest / newest
    entries, in position order."""
    model = model_for(policy)
    ids = prompt(batch=2, length=40)
    new = 6
    with policy.scores_from(model):
        out = greedy_generate(model, ids, new, policy=policy, prefill_chunk=chunk)
    fed = 40 + new - 1  # the last generated token is never fed back
    assert len(out.cache.layers) == model.config.num_hidden_layers
    if not isinstance(policy, BudgetedPolicy):  # keeps everything
        assert out.tokens_held_after_prefill == 40
        assert all((layer.positions == torch.arange(fed, dtype=torch.int32)).all() for layer in out.cache.layers)
        return
    oldest, newest = policy.protected()
    assert policy.capacity == BUDGET
    ranker = policy.policy if isinstance(policy, BudgetAllocation) else policy
    assert 0 < oldest + newest < BUDGET or ranker.name == "streaming_llm"  # StreamingLLM protects all it keeps
    grown = 0 if policy.evict_during_decode else new - 1  # entries appended after the last eviction
    assert out.cache.tokens_held() == BUDGET + grown
    slots = len(out.cache.layers)
    assert sum(policy.slot_capacity(slot) for slot in range(slots)) == slots * BUDGET
    # where the protected newest entries end: the last token fed, or the prompt when decoding does not evict
    end = fed if policy.evict_during_decode else 40
    kv_heads = model.config.num_key_value_heads
    for slot, layer in enumerate(out.cache.layers):
        capacity, (oldest, newest) = policy.slot_capacity(slot), policy.slot_protected(slot)
        valid = layer.positions >= 0
        if policy.ragged:  # one budget for the layer, shared by its heads
            assert (valid.sum(dim=(1, 2)) == kv_heads * (capacity + grown)).all()
        else:
            assert layer.positions.shape == (2, kv_heads, capacity + grown) and valid.all()
        for seq in range(2):
            for head in range(kv_heads):
                positions = layer.positions[seq, head][valid[seq, head]]
                assert (positions.diff() > 0).all()  # distinct, in position order
                kept = positions[: len(positions) - grown]
                assert kept[:oldest].tolist() == list(range(oldest))
                assert kept[len(kept) - newest:].tolist() == list(range(end - newest, end))
                assert positions[len(kept):].tolist() == list(range(40, 40 + grown))


@pytest.mark.parametrize("chunk", [None, 16], ids=["one-prefill", "chunked-prefill"])
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_respects_its_budget_and_keeps_its_protected_tokens(name, chunk):
    policy = generic_policy(POLICIES[name])
    check_budget_and_protected(policy, chunk)
    if not isinstance(policy, BudgetAllocation) and isinstance(policy, BudgetedPolicy):
        assert policy.slot_capacity(0) == BUDGET


RANKERS = sorted(n for n, c in POLICIES.items() if issubclass(c, BudgetedPolicy) and not issubclass(c, BudgetAllocation)
                 and c.ranking is not BudgetedPolicy.ranking)
WRAPPERS = sorted(n for n, c in POLICIES.items() if issubclass(c, BudgetAllocation))


@pytest.mark.parametrize("inner", RANKERS)
@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_every_budget_wrapper_runs_every_ranking_policy(wrapper, inner):
    """The wrappers around each ranking policy: budgets per layer / per head and the inner's protected entries."""
    assert {"h2o", "snapkv", "tova", "knorm", "expected_attention", "streaming_llm"} <= set(RANKERS)
    check_budget_and_protected(generic_policy(POLICIES[wrapper], inner=inner), chunk=None)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_declares_its_settings_as_dataclass_fields(name):
    cls = POLICIES[name]
    assert "__dataclass_fields__" in cls.__dict__, f"{cls.__name__} must be decorated with @dataclass(kw_only=True)"
    policy = generic_policy(cls)
    fields = [f.name for f in cls.setting_fields()]
    assert set(policy.settings()) == {"name", "budget", *fields} and policy.settings()["name"] == name
    assert build_policy(name, **{f: getattr(policy, f) for f in fields}) == policy
    hints = typing.get_type_hints(cls)
    for field in fields:  # a value of the wrong type is refused, naming the setting
        if hints[field] in (int, float, bool, int | None, float | None):
            with pytest.raises(SwiftKVInputError, match=f"cache policy '{name}': {field}='x' must be"):
                cls(**{**{f: getattr(policy, f) for f in fields}, field: "x"})


def test_build_policy_names_the_valid_settings():
    with pytest.raises(SwiftKVInputError, match=r"cache policy 'h2o' has no setting 'recent_shar': its settings are "
                                                r"budget \(required\), recent_share=0\.5, observation_window=None\."):
        build_policy("h2o", budget=8, recent_shar=0.4)
    with pytest.raises(SwiftKVInputError, match="cache policy 'full' has no setting 'budget': its settings are none"):
        build_policy("full", budget=8)
    with pytest.raises(SwiftKVInputError, match=r"cache policy 'keyformer': tau_end=0\.0 must be > 0"):
        build_policy("keyformer", tau_end=0)
    with pytest.raises(SwiftKVInputError, match=r"cache policy 'snapkv': pool_kernel=4 must be odd"):
        build_policy("snapkv", budget=8, pool_kernel=4)
    with pytest.raises(SwiftKVInputError, match=r"cache policy 'h2o': recent_share=1\.5 must be a share"):
        H2O(8, recent_share=1.5)
    with pytest.raises(SwiftKVInputError, match=r"cache policy 'streaming_llm': budget='half' is not understood"):
        StreamingLLM("half")
    assert Keyformer().budget == Budget(fraction=0.6) and Keyformer().tau_init == 1.0  # its own defaults
    assert H2O(8, recent_share=1).recent_share == 1.0 and isinstance(H2O(8, recent_share=1).recent_share, float)


def test_a_policy_registers_itself_by_declaring_its_name():
    try:
        @dataclasses.dataclass(kw_only=True)
        class KeepNewest(BudgetedPolicy):
            name = "test_keep_newest"
            margin: int = 1

            def protected(self):
                return 0, self.capacity

            def select(self, view, step):
                return self.keep_top(torch.zeros(view.positions.shape))

        assert POLICIES["test_keep_newest"] is KeepNewest
        policy = build_policy("test_keep_newest", budget="50%", margin=2)
        assert policy.settings() == {"name": "test_keep_newest", "budget": "50% of the prompt", "margin": 2}
        with pytest.raises(TypeError, match="two cache policies are named 'test_keep_newest'"):
            class Again(CachePolicy):
                name = "test_keep_newest"
    finally:
        POLICIES.pop("test_keep_newest", None)
    assert "" not in POLICIES and BudgetedPolicy not in POLICIES.values()  # intermediate classes do not register


@pytest.mark.parametrize("first", ["swiftkv_train.policies", "swiftkv_train.policies.cache",
                                   "swiftkv_train.methods", "swiftkv_train.methods.locret.policy"])
def test_policies_import_in_any_order(first):
    """swiftkv_train.policies asks the method registry for cache slots, and a method may ship a policy: importing
    either package first (in a fresh interpreter) must work and register every policy."""
    code = (f"import {first}\nfrom swiftkv_train.policies import POLICIES\n"
            "from swiftkv_train.methods import METHODS\nprint(sorted(POLICIES))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(sorted(POLICIES))

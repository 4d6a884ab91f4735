"""Question-independent compression (greedy_generate(..., question_ids=...), the needle suite's default): the policy
compresses the context alone; the question is appended afterwards, never evicted, never scored."""

import pytest
import torch

from swiftkv_train.errors import SwiftKVInputError
from swiftkv_train.eval import evaluate
from swiftkv_train.models import load_pretrained
from swiftkv_train.policies import H2O, POLICIES, BudgetedPolicy, FullCache, SnapKV, StreamingLLM, greedy_generate

from helpers import one_thread  # noqa: F401 - autouse: every test here runs on one thread
from test_policies import generic_policy, model_for

CONTEXT, QUESTION = 30, 6


@pytest.fixture(scope="module")
def tiny():
    model, tok = load_pretrained("random:tiny")
    return model, tok


def ids(batch, length, seed):
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


class NewestOnly(StreamingLLM):
    """StreamingLLM without sinks (keeps only the newest entries: it WOULD keep a question), recording every
    position it is shown. Not registered (declares no name of its own)."""

    def select(self, view, step):
        self.shown.append(view.positions.clone())
        return super().select(view, step)


def newest_only(budget):
    policy = NewestOnly(budget, sink_tokens=0)
    policy.shown = []
    return policy


def held_positions(out) -> list[torch.Tensor]:
    return [layer.positions for layer in out.cache.layers]


@pytest.mark.parametrize("chunk", [None, 8], ids=["one-prefill", "chunked-prefill"])
def test_a_policy_keeping_the_newest_entries_cannot_keep_the_question(tiny, chunk):
    model, _ = tiny
    context, question = ids(2, CONTEXT, 0), ids(2, QUESTION, 1)
    new = 4
    fed = CONTEXT + QUESTION + new - 1  # the last generated token is never fed back
    policy = newest_only("40%")
    out = greedy_generate(model, context, new, policy=policy, question_ids=question, prefill_chunk=chunk)
    # The budget is a share of the CONTEXT (kvpress's ratio): floor(30 * 0.4), not floor(36 * 0.4).
    assert policy.capacity == 12
    assert policy.shown and all(int(p.max()) < CONTEXT for p in policy.shown)  # it never saw a question entry
    assert out.tokens_held_after_context == 12 and out.question_tokens == QUESTION
    assert out.tokens_held_after_prefill == 12 + QUESTION
    expected = list(range(CONTEXT - 12, CONTEXT)) + list(range(CONTEXT, fed))  # newest context, then all the rest
    for positions in held_positions(out):
        assert positions.shape == (2, 2, len(expected))
        assert (positions == torch.tensor(expected, dtype=torch.int32)).all()

    # The same policy compressing context + question together (query-aware) does keep question entries: the check
    # above ("everything it decided on lies in the context") fails there.
    aware = newest_only("40%")
    same = greedy_generate(model, torch.cat([context, question], 1), new, policy=aware, prefill_chunk=chunk)
    assert aware.capacity == 14
    assert any(int(p.max()) >= CONTEXT for p in aware.shown)
    kept_question = [int(((p >= CONTEXT) & (p < CONTEXT + QUESTION)).sum()) for p in held_positions(same)]
    assert all(k > 0 for k in kept_question)
    for positions in held_positions(same):  # it evicted while decoding: only the newest 14 of all fed tokens
        assert (positions == torch.arange(fed - 14, fed, dtype=torch.int32)).all()


@pytest.mark.parametrize("make", [lambda: None, lambda: FullCache(), lambda: H2O(1000), lambda: SnapKV(1000)],
                         ids=["no-policy", "full", "h2o-large-budget", "snapkv-large-budget"])
@pytest.mark.parametrize("chunk", [None, 7], ids=["one-prefill", "chunked-prefill"])
def test_full_cache_question_independent_equals_one_shot_prompt(tiny, make, chunk):
    model, _ = tiny
    context, question = ids(2, CONTEXT, 2), ids(2, QUESTION, 3)
    one_shot = greedy_generate(model, torch.cat([context, question], 1), 6, keep_logits=True)
    split = greedy_generate(model, context, 6, policy=make(), question_ids=question, keep_logits=True,
                            prefill_chunk=chunk)
    assert torch.equal(split.tokens, one_shot.tokens)
    assert len(split.logits) == 6
    for a, b in zip(split.logits, one_shot.logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert split.tokens_held_after_prefill == CONTEXT + QUESTION and split.tokens_held_after_context == CONTEXT


def _eager_attentions(context):
    """Attention probabilities of the context ALONE, from transformers' eager attention: [1, H_q, C, C] per layer."""
    model, _ = load_pretrained("random:tiny", attn_implementation="eager")
    with torch.no_grad():
        attentions = model(context, output_attentions=True).attentions
    model.set_attn_implementation("sdpa")
    return model, attentions


def test_h2o_scores_come_from_context_rows_only():
    """Accumulated H2O scores (no eviction) == column sums of the context's own attention (query heads of each KV
    head, every context row); the question's and the answer's rows add nothing."""
    context, question = ids(1, 20, 4), ids(1, 5, 5)
    model, attentions = _eager_attentions(context)
    out = greedy_generate(model, context, 4, policy=H2O(64), question_ids=question)
    aware = greedy_generate(model, torch.cat([context, question], 1), 1, policy=H2O(64))
    for layer, aware_layer, probs in zip(out.cache.layers, aware.cache.layers, attentions):
        expected = probs.reshape(1, 2, 2, 20, 20).sum(dim=(2, 3))
        torch.testing.assert_close(layer.scores[..., :20], expected, rtol=1e-4, atol=1e-5)
        assert (layer.scores[..., 20:] == 0).all()  # question and answer entries: never scored
        # query-aware, the question's rows add to the context's scores (so the check above can fail)
        assert (aware_layer.scores[..., :20] - expected).abs().max() > 1e-2


def _snapkv_by_hand(probs, budget, window, kernel):
    """SnapKV's kept positions of one layer, written out: per KV head, the last ``window`` rows' attention summed
    over rows and query heads, max-pooled ``kernel`` wide, the window itself plus the top rest (ties: earlier)."""
    length = probs.shape[-1]
    scores = probs.reshape(2, 2, length, length)[:, :, length - window :].sum(dim=(1, 2))  # [H_kv, C]
    kept = []
    for head in scores.tolist():
        pooled = [max(head[max(0, j - kernel // 2) : j + kernel // 2 + 1]) for j in range(length)]
        rest = sorted(range(length - window), key=lambda j: (-pooled[j], j))[: budget - window]
        kept.append(sorted(rest) + list(range(length - window, length)))
    return torch.tensor(kept, dtype=torch.int32)


def test_snapkv_keeps_what_the_context_alone_selects():
    context, question = ids(1, 40, 6), ids(1, 5, 7)
    model, attentions = _eager_attentions(context)
    new, budget = 3, 16
    policy = SnapKV(budget, observation_window=4, pool_kernel=5)
    out = greedy_generate(model, context, new, policy=policy, question_ids=question)
    aware = greedy_generate(model, torch.cat([context, question], 1), new, policy=SnapKV(budget, observation_window=4,
                                                                                         pool_kernel=5))
    fed = 40 + 5 + new - 1
    differs = False
    for layer, aware_layer, probs in zip(out.cache.layers, aware.cache.layers, attentions):
        expected = _snapkv_by_hand(probs[0], budget, 4, 5)
        assert torch.equal(layer.positions[0, :, :budget], expected)
        assert (layer.positions[0, :, budget:] == torch.arange(40, fed, dtype=torch.int32)).all()
        differs |= not torch.equal(aware_layer.positions[0, :, :budget], expected)
    assert differs  # with the question in its observation window SnapKV keeps other entries


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_keeps_the_question_and_decides_on_the_context_alone(name):
    """Any registered policy (its own defaults, a small budget): everything held at or after the context's end is
    the question and the answer, complete; what it kept of the context is what it held when the context ended."""
    policy = generic_policy(POLICIES[name])
    model = model_for(policy)
    context, question, new = ids(2, 40, 8), ids(2, QUESTION, 9), 5
    fed = 40 + QUESTION + new - 1
    with policy.scores_from(model):
        out = greedy_generate(model, context, new, policy=policy, question_ids=question)
    context_held = []
    for positions in held_positions(out):
        tail = positions[..., -(fed - 40):]
        assert (tail == torch.arange(40, fed, dtype=torch.int32)).all()
        context_held.append(((positions >= 0) & (positions < 40)).sum(-1).float().mean())  # -1: padding
    # frozen after the context: what it holds of the context is what it kept when the context ended
    assert float(torch.stack(context_held).mean()) == pytest.approx(out.tokens_held_after_context)
    if isinstance(policy, BudgetedPolicy):
        assert out.tokens_held_after_context < 40


def test_question_ids_errors(tiny):
    model, _ = tiny
    with pytest.raises(SwiftKVInputError, match="question_ids must be \\[batch, length>0\\] with the context's batch"):
        greedy_generate(model, ids(2, 10, 0), 2, question_ids=ids(1, 3, 0))
    with pytest.raises(SwiftKVInputError, match="question_ids must be"):
        greedy_generate(model, ids(1, 10, 0), 2, question_ids=ids(1, 0, 0))


def test_needle_suite_splits_context_and_question(tiny, tmp_path):
    """The needle suite's default is question-independent: the context is the prompt up to the end of the haystack;
    query_aware=true compresses the whole prompt. Both record the mode."""
    model, tok = tiny
    (tmp_path / "a.txt").write_text("The hills are green and the rivers run to the sea. " * 40)
    needle = {"haystack": str(tmp_path), "context_lengths": [300], "depths": [50]}
    runs = {}
    for aware in (False, True):
        res = evaluate(model, tok, "needle", progress=False, needle={**needle, "query_aware": aware},
                       policies={"names": ["streaming_llm"], "budget": "50%"})
        runs[aware] = res["needle"][1]
        assert res["needle"][1]["settings"]["query_aware"] is aware
    independent, aware = runs[False]["trials"][0], runs[True]["trials"][0]
    from swiftkv_train.eval.needle import NEEDLE, template_parts

    _, after, _ = template_parts(tok, NEEDLE.question, NEEDLE.answer_prefix, NEEDLE.intro)
    assert independent["question_tokens"] == len(after) and independent["context_tokens"] == 300 - len(after)
    assert independent["kv_context_tokens_held"] == (300 - len(after)) // 2  # 50% of the context
    assert independent["kv_tokens_held"] == (300 - len(after)) // 2 + len(after)
    assert aware["question_tokens"] == 0 and aware["kv_tokens_held"] == 150  # 50% of the whole prompt

"""Locret's retaining heads plugged into the shared cache-policy interface: the ``locret`` policy (a
LearnedScorePolicy whose ``scores_from(model)`` hooks the heads)."""

import pytest
import torch

from swiftkv_train.errors import SwiftKVInputError
from swiftkv_train.methods.locret import LocretConfig, to_locret
from swiftkv_train.methods.locret.policy import LocretPolicy, locret_policy
from swiftkv_train.models import load_pretrained
from swiftkv_train.policies import POLICIES, LearnedScorePolicy, build_policy, greedy_generate


@pytest.fixture(scope="module")
def locret_model():
    base, _ = load_pretrained("random:tiny")
    model = to_locret(base, LocretConfig(head_hidden_size=16, budget=64, chunk_size=16, stabilizers=4, n_local=4))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random heads with real spread, so the ranking is not decided by ties
        for _, p in model.retaining_head_parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model.eval()


def direct_scores(model, ids):
    """Each layer's retaining-head scores [B, H_kv, S], from a plain full forward (independent of any cache)."""
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True, use_cache=False).hidden_states
        out = []
        for i, layer in enumerate(model.model.layers):
            x = layer.input_layernorm(hidden[i])
            attn = layer.self_attn
            out.append(attn.retaining_scores(attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)))
    return out


def test_locret_heads_decide_what_a_policy_cache_keeps(locret_model):
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    budget, stabilizers = 12, 3
    policy = build_policy("locret", budget=budget, stabilizers=stabilizers)
    assert POLICIES["locret"] is LocretPolicy and isinstance(policy, LearnedScorePolicy)
    with policy.scores_from(locret_model):
        out = greedy_generate(locret_model, ids, 3, policy=policy)
    for layer, scores in zip(out.cache.layers, direct_scores(locret_model, ids)):
        for head in range(scores.shape[1]):
            top = scores[0, head, : 40 - stabilizers].topk(budget - stabilizers).indices.tolist()
            expected = sorted(top) + list(range(40 - stabilizers, 40)) + [40, 41]  # + decoded tokens
            assert layer.positions[0, head].tolist() == expected


def test_full_budget_reproduces_the_full_cache(locret_model):
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(2))
    reference = greedy_generate(locret_model, ids, 6, keep_logits=True)
    policy = locret_policy(locret_model, budget=64)
    assert isinstance(policy, LocretPolicy) and policy.stabilizers == 4  # the model's own locret_stabilizers
    with policy.scores_from(locret_model):
        got = greedy_generate(locret_model, ids, 6, policy=policy, keep_logits=True)
    assert torch.equal(got.tokens, reference.tokens)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(reference.logits), rtol=0, atol=1e-5)


def test_models_without_heads_are_refused():
    base, _ = load_pretrained("random:tiny")
    with pytest.raises(SwiftKVInputError, match="cache policy 'locret' ranks entries with Locret's retaining heads, "
                                                "and LlamaForCausalLM has none"):
        locret_policy(base)
    with pytest.raises(SwiftKVInputError, match="has none"):
        with LocretPolicy(8).scores_from(base):
            pass
    from swiftkv_train.eval.api import evaluate
    from swiftkv_train.models.tiny import byte_tokenizer

    # the evaluation refuses it before any suite runs (the missing haystack is never reached)
    with pytest.raises(SwiftKVInputError, match="has none"):
        evaluate(base, byte_tokenizer(), "needle", needle={"haystack": "/nonexistent"},
                 policies={"names": ["locret"]}, progress=False)


def test_evaluation_harness_runs_the_locret_policy(locret_model, tmp_path):
    from swiftkv_train.eval.api import evaluate
    from swiftkv_train.models.tiny import byte_tokenizer

    essays = tmp_path / "essays"
    essays.mkdir()
    (essays / "a.txt").write_text("The grass is green and the sky is blue today. " * 60)
    result = evaluate(locret_model, byte_tokenizer(), "needle", needle={"haystack": str(essays),
                      "context_lengths": [300], "depths": [50.0], "max_new_tokens": 4},
                      policies={"names": ["locret"], "budget": "100", "overrides": {"locret": {"stabilizers": 8}}},
                      progress=False)
    runs = {run["policy"]: run for run in result["needle"]}
    assert set(runs) == {"full", "locret@100"}
    assert runs["locret@100"]["settings"]["policy"] == {"name": "locret", "budget": "100 tokens", "stabilizers": 8,
                                                        "evict_during_decode": False}
    assert runs["locret@100"]["kv_bytes_per_token"] < runs["full"]["kv_bytes_per_token"]

"""The README.md (model card) written into every export: YAML front matter plus measured numbers."""

import json

import yaml

from .run_logger import redact_secrets


def _table(evals: dict[str, dict]) -> str:
    if not evals:
        return "No evaluation was run.\n"
    keys = ["kl", "top1", "ppl_teacher", "ppl_student", "tokens"]
    lines = ["| when | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for when, stats in evals.items():
        cells = [f"{stats[k]:.4g}" if isinstance(stats.get(k), float) else str(stats.get(k, "")) for k in keys]
        lines.append(f"| {when} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def chosen_transform(transform: dict) -> dict:
    """``cfg.transform`` as a card lists it: the name and only the chosen method's section (the other sections
    are defaults of methods this model was not trained with)."""
    name = transform["name"]
    return {"name": name, name: transform[name]}


def render_model_card(base_model: str, recipe: str, transform: str, hyperparameters: dict, evals: dict,
                      lean: bool) -> str:
    hyperparameters = redact_secrets(hyperparameters)
    front = {
        "base_model": base_model,
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["swiftkv_train", transform, "knowledge-distillation"],
        "swiftkv_train": {"recipe": recipe, "transform": transform, "lean": lean, "eval": evals},
    }
    body = f"""# {recipe}

{transform} variant of `{base_model}`, produced by swiftkv_train (recipe `{recipe}`).
{"Lean export: only the weights the transformed model needs, in bf16." if lean else
 "Full export: every weight, including the original model's (teacher mode still available)."}

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("<this directory or repo>", trust_remote_code=True)
# a plain tokenizer: without trust_remote_code=False, transformers would ask to run the model's config code
tokenizer = AutoTokenizer.from_pretrained("<this directory or repo>", trust_remote_code=False)
```

## Fidelity to the original model (held-out split)
KL(teacher || model) in nats per token, top-1 agreement, perplexities on the assistant tokens of held-out data.

{_table(evals)}
## Hyperparameters
```json
{json.dumps(hyperparameters, indent=2, default=str)}
```
"""
    return "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n\n" + body

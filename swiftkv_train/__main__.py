"""`python -m swiftkv_train`: convert the embedded default model to SwiftKV and compare it with the original.

(The distillation trainer takes over this entry point once it lands.)
"""

import argparse
import time

import torch

from .metrics import FidelityAccumulator, next_token_targets
from .models import load_pretrained
from .transform import to_swiftkv

QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "What is 12 times 3?"]


def chat_ids(tokenizer, question):
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--num-key-value-layers", type=int, default=15)
    parser.add_argument("--key-value-group-size", type=int, default=1)
    args = parser.parse_args(argv)

    model, tok = load_pretrained(args.model)
    student = to_swiftkv(model, args.num_key_value_layers, args.key_value_group_size)
    print(f"{args.model}: {model.config.num_hidden_layers} layers -> SwiftKV M={args.num_key_value_layers}, "
          f"g={args.key_value_group_size}")
    fidelity = FidelityAccumulator()
    for question in QUESTIONS:
        ids = chat_ids(tok, question)
        with torch.no_grad():
            answers = {}
            for name, enabled in (("teacher", False), ("student", True)):
                start = time.perf_counter()
                out = student.swiftkv(enabled).generate(ids, max_new_tokens=24, do_sample=False)
                answers[name] = (tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True), time.perf_counter() - start)
            full = answers["teacher"][0]
            seq = tok(tok.apply_chat_template([{"role": "user", "content": question}, {"role": "assistant", "content": full}],
                                              tokenize=False), return_tensors="pt", add_special_tokens=False).input_ids
            fidelity.update(student.swiftkv(False)(seq).logits, student.swiftkv(True)(seq).logits, next_token_targets(seq))
        print(f"\nQ: {question}")
        for name, (text, seconds) in answers.items():
            print(f"  {name:8s} ({seconds:4.1f} s): {text!r}")
    stats = fidelity.compute()
    print(f"\nfidelity to the teacher before distillation: KL {stats['kl']:.3f} nats/token, "
          f"top-1 agreement {stats['top1']:.2f}, ppl teacher {stats['ppl_teacher']:.1f} / student {stats['ppl_student']:.1f}")


if __name__ == "__main__":
    main()

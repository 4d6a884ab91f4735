"""Long-context training samples for Locret's retaining heads from a folder of plain-text essays.

Usage: python scripts/make_locret_data.py --essays /work/shared/data/pg_essays --out locret_long.jsonl \
           [--samples 1500 --min-chars 4000 --max-chars 14000 --holdout-chars 60000 --seed 0]

Each sample (``prompt_response`` format: {"prompt", "response"}) is a window of essay text followed by a question
whose answer sits somewhere in that window: the sentence that follows a quoted sentence. The labels Locret trains
on are the answer tokens' attention to the prompt, so the heads learn to keep what a later question needs,
wherever it sits in a long prompt (the role LongAlpaca's long-document QA plays in the paper).

Held out: the first essays in name order, up to ``--holdout-chars`` characters, are never used. The evaluation
harness builds its needle haystacks from the essays in name order, so its prompts (up to ~7K tokens here) are text
the heads never trained on. Nothing is copied into the repository: the essays are read at run time.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
QUESTION = 'In the text above, which sentence comes right after this one: "{anchor}"? Quote it exactly.'


def essay_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.glob("*.txt") if not p.name.isupper() and "LICENSE" not in p.name)
    if not files:
        raise SystemExit(f"--essays {folder}: no .txt essays found")
    return files


def training_essays(folder: Path, holdout_chars: int) -> tuple[list[str], list[str]]:
    """(held-out names, training texts): the first essays in name order up to ``holdout_chars`` are held out."""
    held, texts, seen = [], [], 0
    for path in essay_files(folder):
        text = path.read_text(errors="replace")
        if seen < holdout_chars:
            held.append(path.name)
            seen += len(text)
        else:
            texts.append(text)
    if not texts:
        raise SystemExit(f"--holdout-chars {holdout_chars} holds out every essay: lower it")
    return held, texts


def sentences(text: str) -> list[str]:
    flat = re.sub(r"\s+", " ", text).strip()
    return [s.strip() for s in _SENTENCE_END.split(flat) if len(s.strip()) > 20]


def make_sample(rng: random.Random, sents: list[str], min_chars: int, max_chars: int) -> dict | None:
    """A window of consecutive sentences of min..max characters and a question about one pair inside it."""
    target = rng.randint(min_chars, max_chars)
    start = rng.randrange(len(sents))
    window, size = [], 0
    for sent in sents[start:]:
        if size + len(sent) > target and window:
            break
        window.append(sent)
        size += len(sent) + 1
    if size < min_chars or len(window) < 4:
        return None
    k = rng.randrange(len(window) - 1)  # the anchor; its successor is the answer
    anchor, answer = window[k], window[k + 1]
    if len(anchor) > 300 or window.count(anchor) > 1:
        return None
    prompt = " ".join(window) + "\n\n" + QUESTION.format(anchor=anchor)
    return {"prompt": prompt, "response": answer}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--essays", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=1500)
    parser.add_argument("--min-chars", type=int, default=4000)
    parser.add_argument("--max-chars", type=int, default=14000)
    parser.add_argument("--holdout-chars", type=int, default=60000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0 < args.min_chars <= args.max_chars:
        raise SystemExit("--min-chars must be positive and at most --max-chars")
    held, texts = training_essays(args.essays, args.holdout_chars)
    split = [sentences(t) for t in texts]
    rng = random.Random(args.seed)
    out, tries = [], 0
    while len(out) < args.samples and tries < 50 * args.samples:
        tries += 1
        sample = make_sample(rng, rng.choice(split), args.min_chars, args.max_chars)
        if sample is not None:
            out.append(sample)
    if len(out) < args.samples:
        raise SystemExit(f"only {len(out)} samples could be made: lower --min-chars or --samples")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(s) + "\n" for s in out))
    tmp.replace(args.out)
    print(json.dumps({"out": str(args.out), "samples": len(out), "held_out_essays": held,
                      "training_essays": len(texts)}))


if __name__ == "__main__":
    main()

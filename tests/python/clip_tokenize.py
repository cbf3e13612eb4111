"""Reference ids from open_clip's CLIP tokenizer, for the Rust parity test.

Usage: clip_tokenize.py JOBS.json

JOBS.json holds a list of jobs, each {"context_length": int, "texts": [str, ...]}. The script
prints one JSON list with, per job, the ids that open_clip.get_tokenizer('ViT-B-32') gives each
text at that context length (a list of context_length ints per text).
"""

import json
import sys

import open_clip


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as f:
        jobs = json.load(f)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    results = []
    for job in jobs:
        texts = job["texts"]
        ids = tokenizer(texts, context_length=job["context_length"]) if texts else []
        results.append([row.tolist() for row in ids])
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()

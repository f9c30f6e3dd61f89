#!/usr/bin/env python3
"""Writes a larger evaluation set for `kvgate eval` from the reference model's held-out files.

    python3 tools/export_eval_set.py --model models/reference --files 160 --out heldout_ids.json

Runs on the machine the reference model was trained on (the GPU machine: the corpus is the Python
sources installed there). It redoes tools/train_reference_model.py's corpus walk and held-out split
(sha1 of each file's content, 2% of distinct files: never trained on), tokenizes the held-out files
with the model's committed tokenizer.json and keeps the first `--files` files of at least
EVAL_FILE_TOKENS tokens, in the walk's order, truncated to that length: the same rule the training
run used for its 24 files. Before writing, it checks that its first files are exactly the committed
models/reference/eval/heldout_ids.json (same paths, same ids), so a different corpus or tokenizer
is an error, not a silently different evaluation set.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tokenizers import Tokenizer  # noqa: E402

import train_reference_model as trm  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="reference model folder (tokenizer.json, eval/)")
    ap.add_argument("--files", type=int, default=160)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    tok = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
    _, heldout = trm.load_corpus(512 * 1024, 0)
    ids = trm.encode_files(tok, [t for _, t in heldout], float("inf"))
    long_files = [(rel, x) for (rel, _), x in zip(heldout, ids) if len(x) >= trm.EVAL_FILE_TOKENS]
    trm.log(f"{len(heldout)} held-out files, {len(long_files)} with >= {trm.EVAL_FILE_TOKENS} tokens")

    with open(os.path.join(args.model, "eval", "heldout_ids.json")) as f:
        committed = json.load(f)["files"]
    for i, c in enumerate(committed):
        rel, x = long_files[i]
        if c.get("path") != rel or c["ids"] != x[:trm.EVAL_FILE_TOKENS]:
            sys.exit(f"held-out file {i} differs from the committed set ({c.get('path')} vs {rel}): "
                     "not the training machine's corpus or tokenizer")
    chosen = long_files[:args.files]
    with open(args.out, "w") as f:
        json.dump({"generator": "tools/export_eval_set.py (split of tools/train_reference_model.py)",
                   "description": "held-out files (split by content hash, never trained on), "
                                  "token ids with BOS, first %d tokens each" % trm.EVAL_FILE_TOKENS,
                   "files": [{"path": rel, "ids": x[:trm.EVAL_FILE_TOKENS]} for rel, x in chosen]},
                  f, separators=(",", ":"))
    trm.log(f"wrote {len(chosen)} files to {args.out} (the first {len(committed)} match the "
            "committed set)")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Cross-checks the committed tiny-model goldens (written by tools/reference_forward.py) against
Hugging Face transformers itself, on a machine that has torch + transformers (the GPU machine).

    python3 tools/check_goldens_with_transformers.py tests/data/tiny_golden

For each variant it regenerates the model with tools/make_tiny_model.py, loads it with
AutoModelForCausalLM in float64 (eager attention), runs every golden prompt and prints the largest
relative difference (max |hf - golden| / max |golden| per prompt). It also loads tokenizer.json with
AutoTokenizer and prints a sample encoding. Exit status 1 if any difference exceeds 1e-6.
"""

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
import transformers


def main():
    golden_dir = sys.argv[1]
    maker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "make_tiny_model.py")
    worst = 0.0
    print("transformers", transformers.__version__, "torch", torch.__version__)
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("llama", "qwen2", "qwen3"):
            model_dir = os.path.join(tmp, variant)
            subprocess.run([sys.executable, maker, model_dir, "--variant", variant], check=True)
            with open(os.path.join(golden_dir, variant + ".json")) as f:
                golden = json.load(f)
            model = transformers.AutoModelForCausalLM.from_pretrained(
                model_dir, torch_dtype=torch.float64, attn_implementation="eager")
            model.eval()
            for i, ids in enumerate(golden["prompts"]):
                with torch.no_grad():
                    logits = model(torch.tensor([ids])).logits[0].numpy()
                rows = [r for r in golden["rows"] if r["prompt"] == i]
                want = np.array([r["logits"] for r in rows])
                got = logits[[r["position"] for r in rows]]
                rel = np.abs(got - want).max() / np.abs(want).max()
                worst = max(worst, rel)
                print(f"{variant} prompt {i} (len {len(ids)}): max rel diff {rel:.3g}")
            tok = transformers.AutoTokenizer.from_pretrained(model_dir)
            text = "The quick brown fox measured 12345 tokens!\n  def f(x):"
            print(variant, "tokenizer:", tok(text)["input_ids"])
    print("worst", worst)
    sys.exit(0 if worst < 1e-6 else 1)


if __name__ == "__main__":
    main()

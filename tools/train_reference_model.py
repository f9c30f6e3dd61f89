#!/usr/bin/env python3
"""Trains kvgate's reference model: a small Llama-architecture code model with its own byte-level BPE
tokenizer, on the Python sources installed on the GPU machine, and writes everything the repository
commits about it in one run.

    PYTHONUNBUFFERED=1 python3 tools/train_reference_model.py --out $OUT/work --seconds 540

Runs on one GPU (PyTorch, transformers, tokenizers) inside one 10-minute device call. Phases:
  1. corpus: every *.py file under the interpreter's site-packages and standard library,
     de-duplicated by content; held-out split BY FILE (sha1 of the content, 2% of files).
  2. tokenizer: Llama-3-style byte-level BPE (Split with the Llama-3 regex, then ByteLevel without
     its own regex; vocabulary 8192; <|begin_of_text|> added by TemplateProcessing,
     <|end_of_text|> separates files), trained with Hugging Face tokenizers on a sample of the
     training files.
  3. a rehearsal of the export (phase 5) on the untrained model, so that a bug there fails in
     seconds, not after the training.
  4. training: LlamaForCausalLM (8 layers, hidden 384, 6 query / 2 KV heads of dim 64, SwiGLU
     1024, RoPE theta 10000, tied embeddings, 2048 positions), bf16 autocast, AdamW, warmup then
     cosine decay over a wall-clock budget, batches of 64 random 2048-token windows.
  5. export: <out>/reference (config.json, model-0000i-of-0000n.safetensors in bf16 under 14 MB
     each + model.safetensors.index.json, tokenizer.json, tokenizer_config.json,
     generation_config.json, README.md with the held-out perplexity);
     <out>/reference_golden (golden.json + logits.f32: transformers' LlamaForCausalLM on the
     exported bf16 weights computed in float64, eager attention: full logits rows at a few
     positions of 6 held-out prompts, top-k, greedy continuations of 16 tokens, tokenizer cases);
     <out>/reference_eval/heldout_ids.json (token ids of long held-out files for `kvgate eval`).
"""

import argparse
import copy
import hashlib
import json
import math
import os
import random
import site
import struct
import sys
import sysconfig
import time

T0 = time.time()


def log(*args):
    print(f"[{time.time() - T0:7.1f}s]", *args, flush=True)


import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
LLAMA3_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SEQ_LEN = 2048
GOLDEN_PROMPT_TOKENS = [16, 48, 128, 256, 384, 512]
GOLDEN_CONTINUATION = 16
EVAL_FILE_TOKENS = 2048 + 256  # per stored held-out file: enough for a 2048 window + probes
EVAL_FILES = 24


# ---- Corpus --------------------------------------------------------------------------------------

def source_roots():
    roots = list(site.getsitepackages())
    roots.append(sysconfig.get_paths()["stdlib"])
    out = []
    for r in roots:
        r = os.path.realpath(r)
        if os.path.isdir(r) and r not in out:
            out.append(r)
    return out


def load_corpus(max_file_bytes, max_files):
    seen = set()
    train, heldout = [], []
    for root in source_roots():
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                if not name.endswith(".py"):
                    continue
                path = os.path.join(dirpath, name)
                try:
                    if os.path.getsize(path) > max_file_bytes or os.path.getsize(path) < 64:
                        continue
                    with open(path, "rb") as f:
                        raw = f.read()
                    text = raw.decode("utf-8")
                except (OSError, UnicodeDecodeError):
                    continue
                digest = hashlib.sha1(raw).hexdigest()
                if digest in seen:
                    continue
                seen.add(digest)
                rel = os.path.relpath(path, root)
                # Held-out split by file: 2% of distinct files, chosen by content hash.
                (heldout if int(digest[:8], 16) % 100 < 2 else train).append((rel, text))
                if max_files and len(seen) >= max_files:
                    return train, heldout
    return train, heldout


# ---- Tokenizer -----------------------------------------------------------------------------------

def train_tokenizer(texts, vocab_size):
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2,
                                  special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1",
                                      special_tokens=[(BOS, bos_id)]),
    ])
    return tok


def encode_files(tok, texts, deadline):
    """Token ids of each file: BOS + text + EOS. Stops early (fewer files) past `deadline`."""
    eos_id = tok.token_to_id(EOS)
    out = []
    for start in range(0, len(texts), 4096):
        if time.time() > deadline:
            log(f"encode: deadline reached after {len(out)} of {len(texts)} files")
            break
        for enc in tok.encode_batch(texts[start:start + 4096]):
            out.append(enc.ids + [eos_id])
    return out


# ---- Model ---------------------------------------------------------------------------------------

def make_config(args, tok):
    kwargs = dict(
        vocab_size=tok.get_vocab_size(), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
        max_position_embeddings=SEQ_LEN, rms_norm_eps=1e-5, hidden_act="silu",
        tie_word_embeddings=True, attention_bias=False, mlp_bias=False, initializer_range=0.02,
        bos_token_id=tok.token_to_id(BOS), eos_token_id=tok.token_to_id(EOS), use_cache=False)
    config = transformers.LlamaConfig(**kwargs)
    return config


def tokenizer_config_json(tok):
    bos_id, eos_id = tok.token_to_id(BOS), tok.token_to_id(EOS)
    entry = lambda content: {"content": content, "lstrip": False, "normalized": False,  # noqa
                             "rstrip": False, "single_word": False, "special": True}
    return {
        "add_bos_token": True, "add_eos_token": False,
        "added_tokens_decoder": {str(bos_id): entry(BOS), str(eos_id): entry(EOS)},
        "bos_token": BOS, "eos_token": EOS, "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"], "model_max_length": SEQ_LEN,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def load_fp64(model_dir, device):
    try:
        m = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float64,
                                                          attn_implementation="eager")
    except TypeError:
        m = transformers.LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float64,
                                                          attn_implementation="eager")
    return m.to(device).eval()


# ---- Retrieval probe (same construction as workers/eval) ----------------------------------------

SYLLABLES = ["ka", "zu", "mo", "ri", "te", "lo", "vi", "na", "pe", "su", "do", "fa", "gu", "hi",
             "ja", "we", "xo", "yu", "be", "co"]


def probe_words(rng, n):
    return ["".join(rng.choice(SYLLABLES) for _ in range(n)) for _ in range(4)]


def retrieval_probe(tok, filler_ids, ctx, rng):
    names = [w.upper() + "_KEY" for w in probe_words(rng, 2)]
    values = probe_words(rng, 4)
    header = "# Configuration constants.\n" + "".join(
        f'{n} = "{v}"\n' for n, v in zip(names, values)) + "\n\n"
    q = rng.randrange(4)
    query = f'\n\n\n{names[q]} = "'
    head_ids = tok.encode(header).ids  # with BOS
    query_ids = tok.encode(query, add_special_tokens=False).ids
    value_ids = tok.encode(values[q], add_special_tokens=False).ids
    n_fill = ctx - len(head_ids) - len(query_ids) - len(value_ids)
    ids = head_ids + filler_ids[:n_fill] + query_ids
    return ids, value_ids


@torch.no_grad()
def retrieval_accuracy(model, tok, files, ctx, n, device):
    rng = random.Random(1234 + ctx)
    hits = 0
    for i in range(n):
        filler = files[i % len(files)][1:]  # drop BOS
        ids, value = retrieval_probe(tok, filler, ctx, rng)
        x = torch.tensor([ids + value[:-1]], device=device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=x).logits[0].float()
        pred = logits[len(ids) - 1:].argmax(-1).tolist()
        hits += int(pred == value)
    return hits / n


# ---- Export --------------------------------------------------------------------------------------

def export(model, tok, config, out_dir, heldout_files, heldout_texts, device, stats, quick):
    ref_dir = os.path.join(out_dir, "reference")
    golden_dir = os.path.join(out_dir, "reference_golden")
    eval_dir = os.path.join(out_dir, "reference_eval")
    for d in (ref_dir, golden_dir, eval_dir):
        os.makedirs(d, exist_ok=True)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    bf16.config.use_cache = True
    bf16.save_pretrained(ref_dir, max_shard_size="14MB", safe_serialization=True)
    del bf16
    tok.save(os.path.join(ref_dir, "tokenizer.json"))
    if not os.path.exists(os.path.join(ref_dir, "generation_config.json")):
        with open(os.path.join(ref_dir, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
                       "do_sample": False}, f, indent=2)
    with open(os.path.join(ref_dir, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config_json(tok), f, indent=2, sort_keys=True)
    shards = sorted(n for n in os.listdir(ref_dir) if n.endswith(".safetensors"))
    sizes = {n: os.path.getsize(os.path.join(ref_dir, n)) for n in shards}
    log("export:", sizes)
    assert all(s < 15 * 1024 * 1024 for s in sizes.values()), sizes
    if len(shards) == 1 and not os.path.exists(os.path.join(ref_dir, "model.safetensors.index.json")):
        log("export: single shard (no index)")

    # Goldens: the exported bf16 weights, float64 compute, eager attention.
    ref = load_fp64(ref_dir, device)
    prompts, texts = [], []
    used = 0
    for rel, text in heldout_texts:
        if len(prompts) == len(GOLDEN_PROMPT_TOKENS):
            break
        target = GOLDEN_PROMPT_TOKENS[len(prompts)]
        lines = text.splitlines(keepends=True)
        if len(lines) < 8:
            continue
        # Take whole lines until the prompt reaches `target` tokens (BOS included).
        acc, n = "", 1
        for line in lines:
            k = len(tok.encode(line, add_special_tokens=False).ids)
            if n + k > target:
                break
            acc, n = acc + line, n + k
        ids = tok.encode(acc).ids
        if len(ids) < max(8, target // 2) or len(ids) > SEQ_LEN - GOLDEN_CONTINUATION:
            continue
        prompts.append(ids)
        texts.append({"file": rel, "text": acc})
        used += 1
    rows, blob = [], []
    greedy, margins = [], []
    with torch.no_grad():
        for p, ids in enumerate(prompts):
            logits = ref(input_ids=torch.tensor([ids], device=device)).logits[0].cpu().numpy()
            positions = sorted({0, len(ids) // 2, len(ids) - 1})
            for pos in positions:
                row = logits[pos].astype(np.float32)
                top = np.argsort(-logits[pos])[:10]
                rows.append({"prompt": p, "position": pos, "offset": len(blob),
                             "top10": [int(t) for t in top]})
                blob.append(row)
            seq, cont, marg = list(ids), [], []
            for _ in range(GOLDEN_CONTINUATION):
                last = ref(input_ids=torch.tensor([seq], device=device)).logits[0, -1]
                top2 = torch.topk(last, 2)
                cont.append(int(top2.indices[0]))
                marg.append(float(top2.values[0] - top2.values[1]))
                seq.append(cont[-1])
            greedy.append(cont)
            margins.append(marg)
    with open(os.path.join(golden_dir, "logits.f32"), "wb") as f:
        for row in blob:
            f.write(row.astype("<f4").tobytes())
    cases = [t["text"] for t in texts[:3]] + [
        "def f(x):\n    return x  # naïve café — ∑ 🚀\n", "\t\r\n  x  =  1\n\n\n", "",
        "class Foo(Bar):\n    '''Doc.'''\n    def __init__(self): pass\n"]
    golden = {
        "generator": "tools/train_reference_model.py",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "compute": "LlamaForCausalLM, exported bf16 weights upcast to float64, eager attention",
        "vocab_size": config.vocab_size, "logits_file": "logits.f32 (little-endian float32 rows)",
        "prompts": prompts, "prompt_sources": texts, "rows": rows,
        "greedy_continuations": greedy, "greedy_top2_margins": margins,
        "tokenizer_cases": [{"text": t, "ids": tok.encode(t).ids} for t in cases],
    }
    with open(os.path.join(golden_dir, "golden.json"), "w") as f:
        json.dump(golden, f, indent=1)
    log(f"goldens: {len(prompts)} prompts, {len(rows)} rows, min greedy margin "
        f"{min(min(m) for m in margins) if margins else 0:.4f}")

    # Held-out perplexity of the exported weights (float64 compute), a few windows.
    if not quick:
        nll, count = 0.0, 0
        with torch.no_grad():
            for ids in heldout_files[:8]:
                x = torch.tensor([ids[:1024]], device=device)
                lg = ref(input_ids=x).logits[0, :-1]
                nll += float(F.cross_entropy(lg, x[0, 1:], reduction="sum"))
                count += x.shape[1] - 1
        stats["heldout_ppl_exported_fp64_1024"] = math.exp(nll / max(count, 1))
        log(f"held-out ppl of exported weights (fp64, first 1024 tokens of 8 files): "
            f"{stats['heldout_ppl_exported_fp64_1024']:.3f}")
    del ref

    long_files = [(rel, ids) for (rel, _), ids in zip(heldout_texts, heldout_files)
                  if len(ids) >= EVAL_FILE_TOKENS]
    chosen = long_files[:EVAL_FILES]
    with open(os.path.join(eval_dir, "heldout_ids.json"), "w") as f:
        json.dump({"generator": "tools/train_reference_model.py",
                   "description": "held-out files (split by content hash, never trained on), "
                                  "token ids with BOS, first %d tokens each" % EVAL_FILE_TOKENS,
                   "files": [{"path": rel, "ids": ids[:EVAL_FILE_TOKENS]} for rel, ids in chosen]},
                  f, separators=(",", ":"))
    log(f"eval set: {len(chosen)} files of {EVAL_FILE_TOKENS} tokens "
        f"({len(long_files)} long held-out files)")

    readme = f"""# kvgate reference model

A {stats.get('params', 0) / 1e6:.1f}M-parameter Llama-architecture code model trained from scratch by
`tools/train_reference_model.py` in one run on one NVIDIA H200, with its own byte-level BPE
tokenizer (vocabulary {config.vocab_size}, Llama-3 pre-tokenizer), on the Python sources installed on
that machine (site-packages and the standard library; {stats.get('train_files', 0)} training files,
{stats.get('heldout_files', 0)} held-out files chosen by content hash, never trained on).

| | |
|---|---|
| architecture | {config.num_hidden_layers} layers, hidden {config.hidden_size}, {config.num_attention_heads} query / {config.num_key_value_heads} KV heads (head_dim {config.hidden_size // config.num_attention_heads}), SwiGLU {config.intermediate_size}, RoPE theta 10000, tied embeddings, {SEQ_LEN} positions |
| weights | bf16, safetensors shards under 14 MB |
| training | {stats.get('steps', 0)} steps of 64 x {SEQ_LEN} tokens = {stats.get('train_tokens', 0) / 1e6:.0f}M tokens ({stats.get('train_seconds', 0):.0f} s, {stats.get('tokens_per_s', 0) / 1e6:.2f}M tokens/s), AdamW, peak lr {stats.get('lr', 0)}, warmup + cosine, bf16 autocast |
| corpus | {stats.get('corpus_tokens', 0) / 1e6:.0f}M training tokens ({stats.get('epochs', 0):.1f} epochs) |
| held-out perplexity | **{stats.get('heldout_ppl', float('nan')):.3f}** ({stats.get('heldout_eval_tokens', 0)} tokens, random {SEQ_LEN}-token windows of held-out files, bf16 autocast); {stats.get('heldout_ppl_exported_fp64_1024', float('nan')):.3f} with the exported bf16 weights in float64 (first 1024 tokens of 8 held-out files) |
| retrieval sanity (bf16, greedy recall of a string literal defined at the start) | ctx 512: {stats.get('retrieval_512', float('nan')):.2f}, ctx 2048: {stats.get('retrieval_2048', float('nan')):.2f} |
| versions | torch {torch.__version__}, transformers {transformers.__version__} |

Goldens for the parity test: tests/data/reference_golden (same run). Held-out token ids for
`kvgate eval`: models/reference/eval/heldout_ids.json. Quality of every KV format on this model:
models/reference/quality.yaml and docs/QUALITY.md.
"""
    with open(os.path.join(ref_dir, "README.md"), "w") as f:
        f.write(readme)
    with open(os.path.join(out_dir, "stats.json"), "w") as f:
        json.dump(stats, f, indent=1)


# ---- Main ----------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seconds", type=float, default=540, help="wall budget of the whole script")
    ap.add_argument("--export-reserve", type=float, default=70)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--max-files", type=int, default=0)
    ap.add_argument("--tokenizer-bytes", type=int, default=48_000_000)
    ap.add_argument("--encode-seconds", type=float, default=90)
    args = ap.parse_args()
    deadline = T0 + args.seconds
    device = "cuda"
    torch.manual_seed(0)
    random.seed(0)
    log("torch", torch.__version__, "transformers", transformers.__version__,
        torch.cuda.get_device_name(0))

    train, heldout = load_corpus(512 * 1024, args.max_files)
    log(f"corpus: {len(train)} train files ({sum(len(t) for _, t in train) / 1e6:.0f} MB), "
        f"{len(heldout)} held-out files")

    rng = random.Random(0)
    sample, total = [], 0
    for i in rng.sample(range(len(train)), len(train)):
        sample.append(train[i][1])
        total += len(train[i][1])
        if total > args.tokenizer_bytes:
            break
    tok = train_tokenizer(sample, args.vocab)
    log(f"tokenizer: vocab {tok.get_vocab_size()} from {total / 1e6:.0f} MB; "
        f"bos {tok.token_to_id(BOS)} eos {tok.token_to_id(EOS)}")

    rng.shuffle(train)
    train_ids = encode_files(tok, [t for _, t in train], time.time() + args.encode_seconds)
    heldout_ids = encode_files(tok, [t for _, t in heldout], time.time() + 60)
    stream = torch.tensor(np.concatenate([np.asarray(x, dtype=np.int32) for x in train_ids]),
                          dtype=torch.int64, device=device)
    held_stream = torch.tensor(
        np.concatenate([np.asarray(x, dtype=np.int32) for x in heldout_ids]),
        dtype=torch.int64, device=device)
    log(f"tokens: train {stream.numel() / 1e6:.1f}M, held-out {held_stream.numel() / 1e6:.2f}M "
        f"({sum(len(t) for _, t in train) / max(stream.numel(), 1):.2f} chars/token)")

    config = make_config(args, tok)
    model = transformers.LlamaForCausalLM(config).to(device)
    params = sum(p.numel() for p in model.parameters())
    log(f"model: {params / 1e6:.2f}M parameters; config rope: "
        f"{getattr(config, 'rope_parameters', None) or getattr(config, 'rope_theta', None)}")
    stats = {"params": params, "train_files": len(train_ids), "heldout_files": len(heldout_ids),
             "corpus_tokens": stream.numel(), "lr": args.lr}

    # Rehearsal of the export on the untrained model: a bug there must fail now, not in 8 minutes.
    export(model, tok, config, os.path.join(args.out, "rehearsal"), heldout_ids,
           list(heldout), device, dict(stats), quick=True)
    log("rehearsal export ok")

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)
    offsets = torch.arange(SEQ_LEN + 1, device=device)
    gen = torch.Generator(device=device)
    gen.manual_seed(0)

    def batch_from(s, n, g):
        starts = torch.randint(0, s.numel() - SEQ_LEN - 1, (n, 1), device=device, generator=g)
        return s[starts + offsets]

    train_end = deadline - args.export_reserve
    t_start = time.time()
    model.train()
    step, tokens = 0, 0
    while True:
        now = time.time()
        if now >= train_end:
            break
        frac = min(1.0, (now - t_start) / max(train_end - t_start, 1e-6))
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        seq = batch_from(stream, args.batch, gen)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=seq[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), seq[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens += seq.numel() - seq.shape[0]
        if step % 100 == 0 or step == 10:
            log(f"step {step} loss {loss.item():.4f} lr {lr:.2e} "
                f"{tokens / (time.time() - t_start) / 1e6:.2f}M tok/s")
    torch.cuda.synchronize()
    train_seconds = time.time() - t_start
    stats.update(steps=step, train_tokens=tokens, train_seconds=train_seconds,
                 tokens_per_s=tokens / train_seconds, epochs=tokens / stream.numel())
    log(f"trained {step} steps, {tokens / 1e6:.0f}M tokens in {train_seconds:.0f}s")

    model.eval()
    g = torch.Generator(device=device)
    g.manual_seed(1)
    nll, count = 0.0, 0
    with torch.no_grad():
        for _ in range(8):
            seq = batch_from(held_stream, 16, g)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(input_ids=seq[:, :-1]).logits
            nll += float(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                         seq[:, 1:].reshape(-1), reduction="sum"))
            count += seq[:, 1:].numel()
    stats["heldout_ppl"] = math.exp(nll / count)
    stats["heldout_eval_tokens"] = count
    log(f"HELD-OUT PERPLEXITY {stats['heldout_ppl']:.3f} over {count} tokens")
    long_files = [ids for ids in heldout_ids if len(ids) > 2100]
    if long_files:
        for ctx in (512, 2048):
            stats[f"retrieval_{ctx}"] = retrieval_accuracy(model, tok, long_files, ctx, 32, device)
            log(f"retrieval sanity ctx {ctx}: {stats[f'retrieval_{ctx}']:.3f}")
    export(model, tok, config, args.out, heldout_ids, list(heldout), device, stats, quick=False)
    log("done")


if __name__ == "__main__":
    main()

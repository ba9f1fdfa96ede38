"""Train the bundled ``tiny-gpt2`` model (a small GPT-2) from a self-generated corpus.

Steps:

1. generate an English corpus with :func:`tools.tiny_corpus.generate_corpus`;
2. train a byte-level BPE tokenizer (GPT-2 style) on it with the ``tokenizers`` library
   and wrap it as a ``transformers`` GPT-2 tokenizer (``<|endoftext|>`` is bos/eos/unk,
   there is no pad token);
3. train a ``GPT2LMHeadModel`` of a few layers from scratch on CPU;
4. save everything with ``save_pretrained`` (safetensors) into ``--out`` together with a
   ``README.md``, and check that ``model.safetensors`` is at most ``--max-mb`` MB;
5. print a greedy continuation of ``"Hi there!!"``.

Nothing is downloaded. Run from the repository root, e.g.::

    python tools/train_tiny_gpt2.py --out qgraph/models/tiny-gpt2 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

EOS = "<|endoftext|>"
PROMPT = "Hi there!!"
REPO_ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train the bundled tiny-gpt2 model.")
    p.add_argument("--out", default="qgraph/models/tiny-gpt2", help="output folder")
    p.add_argument("--steps", type=int, default=2500, help="optimizer steps")
    p.add_argument("--seed", type=int, default=0, help="seed for corpus, init and batches")
    p.add_argument("--threads", type=int, default=1, help="torch / tokenizers threads")
    p.add_argument("--corpus-lines", type=int, default=30000, help="passages in the corpus")
    p.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary size")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--n-positions", type=int, default=256)
    p.add_argument("--block-size", type=int, default=256, help="training sequence length")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=100, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--log-every", type=int, default=50, help="print loss every N steps")
    p.add_argument("--max-mb", type=float, default=8.0, help="limit for model.safetensors (MB, 10^6 bytes)")
    p.add_argument("--sample-tokens", type=int, default=30, help="new tokens in the sample")
    args = p.parse_args(argv)
    if args.block_size > args.n_positions:
        p.error("--block-size must be <= --n-positions")
    if args.n_embd % args.n_head:
        p.error("--n-embd must be divisible by --n-head")
    return args


def train_tokenizer(lines: list[str], vocab_size: int, out_dir: Path, model_max_length: int) -> Any:
    """Train a GPT-2 style byte-level BPE and return a saved/reloaded GPT-2 tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(lines, trainer=trainer)
    model_state = json.loads(raw.to_str())["model"]
    vocab: dict[str, int] = model_state["vocab"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model_state["merges"]]
    tok = GPT2TokenizerFast(
        vocab=vocab,
        merges=merges,
        unk_token=EOS,
        bos_token=EOS,
        eos_token=EOS,
        add_prefix_space=False,
        model_max_length=model_max_length,
    )
    tok.save_pretrained(str(out_dir))
    # Reload through the public loader so training uses exactly what ships.
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(out_dir))


def build_stream(tok: Any, lines: list[str]) -> Any:
    """Token stream: every passage is preceded by ``<|endoftext|>`` (GPT-2 document style)."""
    import torch

    eos_id = tok.convert_tokens_to_ids(EOS)
    ids: list[int] = []
    for enc in tok(lines, add_special_tokens=False)["input_ids"]:
        ids.append(eos_id)
        ids.extend(enc)
    ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.long)


def lr_at(step: int, args: argparse.Namespace) -> float:
    import math

    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def write_readme(out: Path, info: dict[str, Any]) -> None:
    text = f"""# tiny-gpt2

A very small GPT-2 (`model_type: gpt2`, `GPT2LMHeadModel`) bundled with qgraph as a
self-contained test and demo model: it loads with `transformers` from this folder
without any download, exports with a standard GPT-2 ONNX export and continues simple
friendly English text (for example `"Hi there!!"`).

It was trained from scratch on CPU. The training text is **not** third-party data: it is
generated by [`tools/tiny_corpus.py`](../../../tools/tiny_corpus.py) from templates and
word lists written for this project (greetings, small talk, simple sentences about
everyday things). The byte-level BPE tokenizer (GPT-2 style, `<|endoftext|>` as
bos/eos/unk, no pad token) was trained on the same corpus.

## Model

| | |
| --- | --- |
| architecture | `GPT2LMHeadModel`, tied input/output embeddings |
| layers / heads / width | {info["n_layer"]} / {info["n_head"]} / {info["n_embd"]} |
| context (`n_positions`) | {info["n_positions"]} (trained on sequences of {info["block_size"]}) |
| vocabulary | {info["vocab_size"]} byte-level BPE tokens, `<|endoftext|>` = id {info["eos_id"]} |
| parameters | {info["params"]:,} |
| `model.safetensors` | {info["size_bytes"]:,} bytes (fp32) |

## Training

Command (from the repository root, {info["threads"]} CPU thread(s)):

```
{info["command"]}
```

- corpus: {info["corpus_lines"]:,} passages, {info["corpus_tokens"]:,} tokens, seed {info["seed"]}
- {info["steps"]} AdamW steps, batch {info["batch_size"]} x {info["block_size"]} tokens,
  peak lr {info["lr"]}, {info["warmup"]} warmup steps then cosine decay to 10%
- final training loss (mean of the last {info["loss_window"]} steps): {info["final_loss"]:.4f}
- training wall time: {info["train_seconds"] / 60:.1f} min (torch {info["torch_version"]},
  transformers {info["transformers_version"]}, tokenizers {info["tokenizers_version"]})

Greedy continuation of `"Hi there!!"` ({info["sample_tokens"]} new tokens):

```
{info["sample"]}
```

## Usage

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

path = "qgraph/models/tiny-gpt2"
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path)
ids = tok("Hi there!!", return_tensors="pt").input_ids
print(tok.decode(model.generate(ids, max_new_tokens=30, do_sample=False)[0]))
```
"""
    (out / "README.md").write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = str(args.threads)
    # Must be set before torch / tokenizers spin up their thread pools.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS", "RAYON_RS_NUM_CPUS"):
        os.environ[var] = threads
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(args.threads)
    except RuntimeError:
        pass
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)

    import tokenizers
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GPT2Config, GPT2LMHeadModel

    sys.path.insert(0, str(REPO_ROOT))
    from tools.tiny_corpus import generate_corpus

    out = Path(args.out)
    if not out.is_absolute():
        out = REPO_ROOT / out
    t_start = time.perf_counter()

    # (a) corpus
    lines = generate_corpus(args.corpus_lines, args.seed)
    print(f"corpus: {len(lines)} passages, {sum(len(s) for s in lines):,} characters", flush=True)

    # Build in a temp dir, then replace the output folder's managed files at the end.
    work = Path(tempfile.mkdtemp(prefix="tiny-gpt2-"))
    try:
        # (b) tokenizer
        tok = train_tokenizer(lines, args.vocab_size, work, args.n_positions)
        eos_id = tok.convert_tokens_to_ids(EOS)
        vocab_size = len(tok)
        stream = build_stream(tok, lines)
        print(f"tokenizer: vocab {vocab_size}, eos id {eos_id}; corpus tokens {stream.numel():,}", flush=True)
        print(f"  '{PROMPT}' -> {tok.convert_ids_to_tokens(tok(PROMPT).input_ids)}", flush=True)

        # (c) model
        config = GPT2Config(
            vocab_size=vocab_size,
            n_positions=args.n_positions,
            n_embd=args.n_embd,
            n_layer=args.n_layer,
            n_head=args.n_head,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=eos_id,
            eos_token_id=eos_id,
            tie_word_embeddings=True,
        )
        model = GPT2LMHeadModel(config)
        n_params = sum(p.numel() for p in model.parameters())
        est_bytes = 4 * n_params
        print(f"model: {n_params:,} parameters (~{est_bytes / 1e6:.2f} MB fp32)", flush=True)
        if est_bytes > args.max_mb * 1e6:
            print(f"error: model would exceed {args.max_mb} MB", file=sys.stderr)
            return 1

        decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=args.lr,
            betas=(0.9, 0.95),
        )
        gen = torch.Generator().manual_seed(args.seed)
        n_windows = stream.numel() - args.block_size - 1
        model.train()
        t_train = time.perf_counter()
        recent: list[float] = []
        loss_window = min(50, args.steps)
        for step in range(args.steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, args)
            starts = torch.randint(0, n_windows, (args.batch_size,), generator=gen)
            batch = torch.stack([stream[s : s + args.block_size] for s in starts.tolist()])
            loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            recent.append(loss.item())
            recent = recent[-loss_window:]
            if (step + 1) % args.log_every == 0 or step == 0 or step + 1 == args.steps:
                elapsed = time.perf_counter() - t_train
                print(
                    f"step {step + 1:5d}/{args.steps}  loss {loss.item():.4f}  "
                    f"avg{len(recent)} {sum(recent) / len(recent):.4f}  lr {lr_at(step, args):.2e}  "
                    f"{elapsed:7.1f}s",
                    flush=True,
                )
        train_seconds = time.perf_counter() - t_train
        final_loss = sum(recent) / len(recent)
        model.eval()

        # (d) save
        model.generation_config = GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id)
        model.save_pretrained(str(work), safe_serialization=True)
        size = (work / "model.safetensors").stat().st_size
        print(f"model.safetensors: {size:,} bytes", flush=True)
        if size > args.max_mb * 1e6:
            print(f"error: model.safetensors is {size:,} bytes > {args.max_mb} MB", file=sys.stderr)
            return 1

        # (e) sample, from the saved files
        tok2 = AutoTokenizer.from_pretrained(str(work))
        model2 = AutoModelForCausalLM.from_pretrained(str(work))
        ids = tok2(PROMPT, return_tensors="pt").input_ids
        with torch.no_grad():
            gen_ids = model2.generate(ids, max_new_tokens=args.sample_tokens, do_sample=False, pad_token_id=eos_id)
        sample = tok2.decode(gen_ids[0])
        print(f"sample: {sample!r}", flush=True)

        cmd_args = [a for a in (sys.argv[1:] if argv is None else argv)]
        command = "python tools/train_tiny_gpt2.py" + ("" if not cmd_args else " " + shlex.join(cmd_args))
        write_readme(
            work,
            {
                **vars(args),
                "vocab_size": vocab_size,
                "eos_id": eos_id,
                "params": n_params,
                "size_bytes": size,
                "command": command,
                "corpus_tokens": int(stream.numel()),
                "final_loss": final_loss,
                "loss_window": len(recent),
                "train_seconds": train_seconds,
                "torch_version": torch.__version__.split("+")[0],
                "transformers_version": transformers.__version__,
                "tokenizers_version": tokenizers.__version__,
                "sample": sample,
            },
        )

        out.mkdir(parents=True, exist_ok=True)
        for f in sorted(work.iterdir()):
            shutil.copyfile(f, out / f.name)
            print(f"wrote {out / f.name}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"done in {(time.perf_counter() - t_start) / 60:.1f} min (training {train_seconds / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Train a bundled tiny model (``tiny-gpt2`` or ``tiny-llama``) from a self-generated corpus.

Steps, the same for every family:

1. generate an English corpus with :func:`tools.tiny_corpus.generate_corpus`;
2. train a byte-level BPE tokenizer on it with the ``tokenizers`` library and wrap it for
   ``transformers`` (GPT-2: ``<|endoftext|>`` is bos/eos/unk and separates the passages;
   Llama: ``<s>`` is prepended to every text, ``</s>`` ends each passage);
3. train the family's causal LM of a few layers from scratch on CPU (``GPT2LMHeadModel``,
   or ``LlamaForCausalLM`` with RMSNorm, RoPE, grouped KV heads and a SwiGLU MLP);
4. save everything with ``save_pretrained`` (safetensors) into ``--out`` together with a
   ``README.md``, and check that ``model.safetensors`` is at most ``--max-mb`` MB;
5. print a greedy continuation of ``"Hi there!!"``.

Nothing is downloaded. Run from the repository root, e.g.::

    python tools/train_tiny.py --family gpt2 --threads 1
    python tools/train_tiny.py --family llama --threads 1
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROMPT = "Hi there!!"
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Family:
    """What differs between the bundled models: tokenizer wrapping, passage framing, model class."""

    name: str
    title: str  # README: "A very small {title}"
    architecture: str
    special_tokens: tuple[str, ...]  # trained into the BPE first, so their ids are 0, 1, ...
    bos: str
    eos: str
    tokenizer_words: str  # README: how the tokenizer frames text
    layout_words: str  # README: the architecture row

    @property
    def folder(self) -> str:
        return f"tiny-{self.name}"


FAMILIES = {
    "gpt2": Family(
        name="gpt2",
        title="GPT-2",
        architecture="GPT2LMHeadModel",
        special_tokens=("<|endoftext|>",),
        bos="<|endoftext|>",
        eos="<|endoftext|>",
        tokenizer_words="The byte-level BPE tokenizer (GPT-2 style, `<|endoftext|>` as\nbos/eos/unk, no pad token)",
        layout_words="`GPT2LMHeadModel`, tied input/output embeddings",
    ),
    "llama": Family(
        name="llama",
        title="Llama",
        architecture="LlamaForCausalLM",
        special_tokens=("<unk>", "<s>", "</s>"),
        bos="<s>",
        eos="</s>",
        tokenizer_words="The byte-level BPE tokenizer (`<s>` prepended\nto every text as Llama's is, `</s>` ends each training passage, no pad token, no chat template)",
        layout_words="`LlamaForCausalLM`: RMSNorm, RoPE, grouped KV heads, SwiGLU MLP, untied embeddings",
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a bundled tiny model (tiny-gpt2 or tiny-llama).")
    p.add_argument("--family", choices=sorted(FAMILIES), default="gpt2", help="model family (default gpt2)")
    p.add_argument("--out", default=None, help="output folder (default qgraph/models/tiny-FAMILY)")
    p.add_argument("--steps", type=int, default=2500, help="optimizer steps")
    p.add_argument("--seed", type=int, default=0, help="seed for corpus, init and batches")
    p.add_argument("--threads", type=int, default=1, help="torch / tokenizers threads")
    p.add_argument("--corpus-lines", type=int, default=30000, help="passages in the corpus")
    p.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary size")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-kv-head", type=int, default=None, help="llama: KV heads (default 2)")
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--n-inner", type=int, default=None, help="llama: MLP width (default 352)")
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
    if args.family == "gpt2":
        if args.n_kv_head is not None or args.n_inner is not None:
            p.error("--n-kv-head and --n-inner are for --family llama")
    else:
        args.n_kv_head = 2 if args.n_kv_head is None else args.n_kv_head
        args.n_inner = 352 if args.n_inner is None else args.n_inner
        if args.n_head % args.n_kv_head:
            p.error("--n-head must be divisible by --n-kv-head")
    return args


def train_tokenizer(family: Family, lines: list[str], vocab_size: int, out_dir: Path, model_max_length: int) -> Any:
    """Train a byte-level BPE, wrap it for the family, save it and return it reloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, GPT2TokenizerFast, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(family.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(lines, trainer=trainer)
    special = {"bos_token": family.bos, "eos_token": family.eos, "model_max_length": model_max_length}
    if family.name == "gpt2":
        model_state = json.loads(raw.to_str())["model"]
        merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model_state["merges"]]
        tok = GPT2TokenizerFast(vocab=model_state["vocab"], merges=merges, unk_token=family.eos, add_prefix_space=False, **special)
    else:
        # Llama's convention: the tokenizer prepends <s> to every text it encodes.
        bos_id = raw.token_to_id(family.bos)
        raw.post_processor = processors.TemplateProcessing(
            single=f"{family.bos} $A", pair=f"{family.bos} $A {family.bos} $B", special_tokens=[(family.bos, bos_id)]
        )
        tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", **special)
    tok.save_pretrained(str(out_dir))
    # Reload through the public loader so training uses exactly what ships.
    return AutoTokenizer.from_pretrained(str(out_dir))


def build_stream(family: Family, tok: Any, lines: list[str]) -> Any:
    """Token stream. GPT-2: ``<|endoftext|>`` before every passage and at the end;
    Llama: ``<s> passage </s>`` (what its tokenizer gives a prompt, then the end of text)."""
    import torch

    bos_id, eos_id = tok.convert_tokens_to_ids(family.bos), tok.convert_tokens_to_ids(family.eos)
    ids: list[int] = []
    for enc in tok(lines, add_special_tokens=False)["input_ids"]:
        ids.append(bos_id)
        ids.extend(enc)
        if family.name != "gpt2":
            ids.append(eos_id)
    if family.name == "gpt2":
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.long)


def build_model(family: Family, args: argparse.Namespace, vocab_size: int, bos_id: int, eos_id: int) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if family.name == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size,
            n_positions=args.n_positions,
            n_embd=args.n_embd,
            n_layer=args.n_layer,
            n_head=args.n_head,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            tie_word_embeddings=True,
        )
        return GPT2LMHeadModel(config)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.n_embd,
        intermediate_size=args.n_inner,
        num_hidden_layers=args.n_layer,
        num_attention_heads=args.n_head,
        num_key_value_heads=args.n_kv_head,
        max_position_embeddings=args.n_positions,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        attention_dropout=0.0,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def lr_at(step: int, args: argparse.Namespace) -> float:
    import math

    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def layout(family: Family, info: dict[str, Any]) -> str:
    if family.name == "gpt2":
        return f"| layers / heads / width | {info['n_layer']} / {info['n_head']} / {info['n_embd']} |"
    return (
        f"| layers / heads / KV heads / width / MLP | {info['n_layer']} / {info['n_head']} / {info['n_kv_head']}"
        f" / {info['n_embd']} / {info['n_inner']} |"
    )


def write_readme(family: Family, out: Path, info: dict[str, Any]) -> None:
    special = f"`{family.eos}` = id {info['eos_id']}"
    if family.bos != family.eos:
        special = f"`{family.bos}` = id {info['bos_id']}, " + special
    text = f"""# {family.folder}

A very small {family.title} (`model_type: {family.name}`, `{family.architecture}`) bundled with qgraph as a
self-contained test and demo model: it loads with `transformers` from this folder
without any download, exports with a standard {family.title} ONNX export and continues simple
friendly English text (for example `"{PROMPT}"`).

It was trained from scratch on CPU. The training text is **not** third-party data: it is
generated by [`tools/tiny_corpus.py`](../../../tools/tiny_corpus.py) from templates and
word lists written for this project (greetings, small talk, simple sentences about
everyday things). {family.tokenizer_words} was trained on the same corpus.

## Model

| | |
| --- | --- |
| architecture | {family.layout_words} |
{layout(family, info)}
| context (`n_positions`) | {info["n_positions"]} (trained on sequences of {info["block_size"]}) |
| vocabulary | {info["vocab_size"]} byte-level BPE tokens, {special} |
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

Greedy continuation of `"{PROMPT}"` ({info["sample_tokens"]} new tokens):

```
{info["sample"]}
```

## Usage

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

path = "qgraph/models/{family.folder}"
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path)
ids = tok("{PROMPT}", return_tensors="pt").input_ids
print(tok.decode(model.generate(ids, max_new_tokens=30, do_sample=False)[0], skip_special_tokens=True))
```
"""
    (out / "README.md").write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    family = FAMILIES[args.family]
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
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    sys.path.insert(0, str(REPO_ROOT))
    from tools.tiny_corpus import generate_corpus

    out = Path(args.out or f"qgraph/models/{family.folder}")
    if not out.is_absolute():
        out = REPO_ROOT / out
    t_start = time.perf_counter()

    # (a) corpus
    lines = generate_corpus(args.corpus_lines, args.seed)
    print(f"corpus: {len(lines)} passages, {sum(len(s) for s in lines):,} characters", flush=True)

    # Build in a temp dir, then replace the output folder's managed files at the end.
    work = Path(tempfile.mkdtemp(prefix=f"{family.folder}-"))
    try:
        # (b) tokenizer
        tok = train_tokenizer(family, lines, args.vocab_size, work, args.n_positions)
        bos_id, eos_id = tok.convert_tokens_to_ids(family.bos), tok.convert_tokens_to_ids(family.eos)
        vocab_size = len(tok)
        stream = build_stream(family, tok, lines)
        print(f"tokenizer: vocab {vocab_size}, bos id {bos_id}, eos id {eos_id}; corpus tokens {stream.numel():,}")
        print(f"  '{PROMPT}' -> {tok.convert_ids_to_tokens(tok(PROMPT).input_ids)}", flush=True)

        # (c) model
        model = build_model(family, args, vocab_size, bos_id, eos_id)
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
        model.generation_config = GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_id)
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
        sample = tok2.decode(gen_ids[0], skip_special_tokens=family.bos != family.eos)
        print(f"sample: {sample!r}", flush=True)

        cmd_args = [a for a in (sys.argv[1:] if argv is None else argv)]
        command = "python tools/train_tiny.py" + ("" if not cmd_args else " " + shlex.join(cmd_args))
        write_readme(
            family,
            work,
            {
                **vars(args),
                "vocab_size": vocab_size,
                "bos_id": bos_id,
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

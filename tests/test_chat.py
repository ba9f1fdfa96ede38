"""``qgraph generate --chat`` and ``generate(..., chat=True)``: a prompt becomes a user message put through the
tokenizer's chat template (one implementation, :func:`qgraph.frontend.hf.encode_prompts`), and generates what
Hugging Face generates from the same ids; a tokenizer without a template is refused in one line, before any work."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from helpers import ENV, cli_command, hf_greedy, random_gpt2, word_tokenizer

from qgraph import AutoModelForCausalLM
from qgraph.errors import GenerationError

pytest.importorskip("torch")

VOCAB = 97
# The user's words after "user:", then "assistant:" where the reply starts.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
PROMPT = "w5 w17 w42 w8"


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random GPT-2 (varied greedy output) whose word-level tokenizer has a chat template."""
    folder = tmp_path_factory.mktemp("chat-model")
    random_gpt2(folder, n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=64, initializer_range=0.3, seed=3)
    word_tokenizer(folder, VOCAB, chat_template=TEMPLATE)
    return folder


def test_chat_generates_hugging_faces_tokens_after_the_template(chat_folder: Path, qgraph_home: Path) -> None:
    from transformers import AutoModelForCausalLM as HFModel
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(chat_folder))
    chat_ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_dict=True)["input_ids"]
    plain_ids = tok(PROMPT)["input_ids"]
    # The template wraps the prompt: <s> user: w5 w17 w42 w8 assistant:
    assert tok.convert_ids_to_tokens(chat_ids) == ["<s>", "user:", *PROMPT.split(), "assistant:"]
    hf = HFModel.from_pretrained(str(chat_folder)).eval()
    n = 10
    want_chat, want_plain = hf_greedy(hf, chat_ids, n, distinct=4), hf_greedy(hf, plain_ids, n)
    assert want_chat != want_plain, "the template must change what is generated, or this test cannot see it applied"

    model = AutoModelForCausalLM.from_pretrained(str(chat_folder))
    out = model.generate([PROMPT, "w9 w9 w30"], max_new_tokens=n, chat=True)
    assert out.tokens[0] == want_chat
    second = tok.apply_chat_template([{"role": "user", "content": "w9 w9 w30"}], add_generation_prompt=True, return_dict=True)
    assert out.tokens[1] == hf_greedy(hf, second["input_ids"], n)
    # The text is what the tokens add after the prompt: decoded alone, a word-level (or SentencePiece) tokenizer's
    # first word would lose the space before it.
    assert out.text is not None and out.text[0] == " " + tok.decode(want_chat, skip_special_tokens=True)
    assert model.generate([PROMPT], max_new_tokens=n).tokens == [want_plain]  # chat is off by default
    assert model.generate(PROMPT, max_new_tokens=n).tokens == [want_plain]  # a string is one prompt, not one per letter

    # The command line: the same ids, so the same tokens (from the artifact just compiled).
    res = subprocess.run(cli_command("generate", PROMPT, "--model", str(chat_folder), "--chat", "--max-new-tokens", str(n), "--json"),
                         capture_output=True, text=True, env={**ENV, "QGRAPH_HOME": os.environ["QGRAPH_HOME"]}, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["tokens"] == [want_chat]
    # Streamed text: the prompt, then the reply on a line of its own.
    res = subprocess.run(cli_command("generate", PROMPT, "--model", str(chat_folder), "--chat", "--max-new-tokens", str(n)),
                         capture_output=True, text=True, env={**ENV, "QGRAPH_HOME": os.environ["QGRAPH_HOME"]}, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"{PROMPT}\n{tok.decode(want_chat, skip_special_tokens=True)}\n"), res.stdout
    # Plain text streams the prompt and its continuation as one decode of both gives them (they ran together).
    res = subprocess.run(cli_command("generate", PROMPT, "--model", str(chat_folder), "--max-new-tokens", str(n)),
                         capture_output=True, text=True, env={**ENV, "QGRAPH_HOME": os.environ["QGRAPH_HOME"]}, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(tok.decode(plain_ids + want_plain, skip_special_tokens=True) + "\n"), res.stdout
    assert res.stdout.startswith(f"{PROMPT} w"), res.stdout


def test_chat_is_refused_in_one_line_without_a_template_or_with_token_ids(chat_folder: Path, tmp_path: Path, qgraph_home: Path) -> None:
    plain = tmp_path / "no-template"
    random_gpt2(plain, n_layer=1, n_head=2, n_embd=16, vocab_size=VOCAB, n_positions=32)
    word_tokenizer(plain, VOCAB)
    with pytest.raises(GenerationError, match=r"has no chat template .*; give the prompt as plain text \(without --chat, chat=False\)"):
        AutoModelForCausalLM.from_pretrained(str(plain)).generate(["w5 w6"], chat=True)
    with pytest.raises(GenerationError, match="chat=True puts text prompts through the chat template; give prompts, not input_ids"):
        AutoModelForCausalLM.from_pretrained(str(chat_folder)).generate(input_ids=[[1, 5, 6]], chat=True)
    assert not qgraph_home.exists(), "a refused chat got as far as the export"
    # A template that fails on one user message (its own raise_exception, as some templates that want a system
    # message do): one line naming the template's error, not jinja2's traceback.
    failing = tmp_path / "failing-template"
    random_gpt2(failing, n_layer=1, n_head=2, n_embd=16, vocab_size=VOCAB, n_positions=32)
    word_tokenizer(failing, VOCAB, chat_template="{{ raise_exception('Conversation must start with a system message') }}")

    env = {**ENV, "QGRAPH_HOME": str(qgraph_home)}
    cases = {
        "no template": (["w5 w6", "--model", str(plain), "--chat"], "has no chat template"),
        "failing template": (
            ["w5 w6", "--model", str(failing), "--chat"],
            "failed on a single user message (Conversation must start with a system message); give the prompt as plain text",
        ),
        "token ids": (
            ["--input-ids", "1,5,6", "--model", str(chat_folder), "--chat"],
            "--chat puts text prompts through the chat template",
        ),
    }
    for name, (args, message) in cases.items():
        res = subprocess.run([*cli_command("generate", *args)], capture_output=True, text=True, env=env, timeout=300)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert lines[-1].startswith("qgraph generate: error: ") and message in lines[-1], f"{name}: {res.stderr}"
    assert not qgraph_home.exists(), "a refused chat got as far as the export"


def test_the_stream_holds_a_character_back_until_its_bytes_are_whole() -> None:
    """GPT-2's byte-level tokens split an emoji or an accented letter; decoded part way, the text ends in U+FFFD, and
    the stream printed that and then never the character (the text's length did not grow when it completed)."""
    from qgraph.frontend.hf import TextStream, load_tokenizer

    tok = load_tokenizer("tiny-gpt2")
    prompt = tok("Hi")["input_ids"]
    text = " ok \U0001f600 caf\u00e9 \u65e5\u672c"
    tokens = tok(text)["input_ids"]
    assert any(tok.decode(tokens[:i]).endswith("\ufffd") for i in range(1, len(tokens))), "no character spans tokens here"
    written: list[str] = []
    stream = TextStream(tok, prompt, written.append)
    for t in tokens:
        stream(0, t)
        assert "\ufffd" not in "".join(written)
    stream.finish()
    assert "".join(written) == text
    chat: list[str] = []
    stream = TextStream(tok, prompt, chat.append, strip=True)
    for t in tokens:
        stream(0, t)
    stream.finish()
    assert "".join(chat) == text.lstrip()

"""Robustness: hostile Hugging Face weight files.

A safetensors file whose header lies (sizes or offsets beyond the file,
tensors that overlap, a header longer than the file, a pickle renamed
``.safetensors``) and a sharded index whose ``weight_map`` leaves the model's
folder are refused in one line before transformers reads anything, in process
and by the CLI. The weights digest of the cache key covers exactly the files
loading reads, shards included.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import cli_command, random_gpt2, run_all

from qgraph.errors import ModelSourceError

torch = pytest.importorskip("torch")

SMALL = dict(n_layer=1, n_head=2, n_embd=16, vocab_size=101, n_positions=32)


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("good") / "model"
    random_gpt2(folder, **SMALL)
    return folder


def _copy(good: Path, dest: Path) -> Path:
    shutil.copytree(good, dest)
    return dest


def _read(path: Path) -> tuple[dict[str, Any], bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _write(path: Path, header: dict[str, Any], body: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def _tensors(header: dict[str, Any]) -> list[str]:
    """Tensor names by offset."""
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _edit(folder: Path, change: Callable[[dict[str, Any], bytes], tuple[dict[str, Any], bytes]]) -> Path:
    st = folder / "model.safetensors"
    _write(st, *change(*_read(st)))
    return folder


def _sharded(folder: Path, weight_map: Callable[[str, str], str]) -> Path:
    """The model split into two shards by an index; ``weight_map(tensor, shard)`` says where the index sends each tensor."""
    header, body = _read(folder / "model.safetensors")
    names = _tensors(header)
    index: dict[str, Any] = {"metadata": {"total_size": len(body)}, "weight_map": {}}
    for part, chunk in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        shard = f"model-0000{part + 1}-of-00002.safetensors"
        start = header[chunk[0]]["data_offsets"][0]
        sub = {
            k: {**header[k], "data_offsets": [header[k]["data_offsets"][0] - start, header[k]["data_offsets"][1] - start]} for k in chunk
        }
        _write(folder / shard, sub, body[start : header[chunk[-1]]["data_offsets"][1]])
        index["weight_map"].update({k: weight_map(k, shard) for k in chunk})
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


# ---------------------------------------------------------------- the cases
def case_data_short(good: Path, d: Path) -> Path:
    # The header declares more bytes than the file holds (the last tensor runs past its end).
    return _edit(_copy(good, d), lambda h, b: (h, b[:-64]))


def case_offset_beyond_the_file(good: Path, d: Path) -> Path:
    def change(h: dict[str, Any], b: bytes) -> tuple[dict[str, Any], bytes]:
        last = _tensors(h)[-1]
        s, e = h[last]["data_offsets"]
        h[last]["data_offsets"] = [s + 4096, e + 4096]
        return h, b

    return _edit(_copy(good, d), change)


def case_overlapping_tensors(good: Path, d: Path) -> Path:
    def change(h: dict[str, Any], b: bytes) -> tuple[dict[str, Any], bytes]:
        a, c = _tensors(h)[:2]
        h[c] = {**h[a]}  # the same bytes twice (and a hole where c was)
        return h, b

    return _edit(_copy(good, d), change)


def case_size_does_not_match_shape(good: Path, d: Path) -> Path:
    def change(h: dict[str, Any], b: bytes) -> tuple[dict[str, Any], bytes]:
        first = _tensors(h)[0]
        h[first]["shape"] = [h[first]["shape"][0] * 2, *h[first]["shape"][1:]]
        return h, b

    return _edit(_copy(good, d), change)


def case_header_longer_than_the_file(good: Path, d: Path) -> Path:
    folder = _copy(good, d)
    st = folder / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(struct.pack("<Q", len(data) + 1000) + data[8:])
    return folder


def case_header_not_json(good: Path, d: Path) -> Path:
    folder = _copy(good, d)
    st = folder / "model.safetensors"
    data = st.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    st.write_bytes(data[:8] + b"{" + b"\xff" * (n - 1) + data[8 + n :])
    return folder


def case_pickle_renamed(good: Path, d: Path) -> Path:
    from safetensors.torch import load_file

    folder = _copy(good, d)
    state = load_file(str(good / "model.safetensors"))  # not the copy: it is mapped, and overwritten below
    torch.save(state, folder / "model.safetensors")  # a zip of pickles under the safetensors name
    return folder


def case_index_dotdot(good: Path, d: Path) -> Path:
    folder = _sharded(_copy(good, d), lambda k, shard: shard)
    outside = folder.parent / f"{folder.name}-outside.safetensors"
    shutil.move(folder / "model-00002-of-00002.safetensors", outside)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: (f"../{outside.name}" if v.startswith("model-00002") else v) for k, v in index["weight_map"].items()}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def case_index_absolute(good: Path, d: Path) -> Path:
    folder = _sharded(_copy(good, d), lambda k, shard: shard)
    outside = folder.parent / f"{folder.name}-outside.safetensors"
    shutil.move(folder / "model-00002-of-00002.safetensors", outside)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: (str(outside) if v.startswith("model-00002") else v) for k, v in index["weight_map"].items()}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def case_index_shard_missing(good: Path, d: Path) -> Path:
    folder = _sharded(_copy(good, d), lambda k, shard: shard)
    (folder / "model-00002-of-00002.safetensors").unlink()
    return folder


def case_index_not_a_map(good: Path, d: Path) -> Path:
    folder = _sharded(_copy(good, d), lambda k, shard: shard)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": ["model-00001-of-00002.safetensors"]}))
    return folder


def case_shard_lies(good: Path, d: Path) -> Path:
    folder = _sharded(_copy(good, d), lambda k, shard: shard)
    shard = folder / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-64])
    return folder


#: Each hostile folder, and what the one-line error must say.
CASES: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    "data_short": (case_data_short, r"model\.safetensors in \S+ is not a valid safetensors file: .* past the end of the file"),
    "offset_beyond_the_file": (
        case_offset_beyond_the_file,
        r"model\.safetensors in \S+ is not a valid safetensors file: .* past the end of the file",
    ),
    "overlapping_tensors": (case_overlapping_tensors, r"model\.safetensors in \S+ is not a valid safetensors file: tensors .* overlap"),
    "size_does_not_match_shape": (
        case_size_does_not_match_shape,
        r"model\.safetensors in \S+ is not a valid safetensors file: tensor .* needs \d+ bytes",
    ),
    "header_longer_than_the_file": (
        case_header_longer_than_the_file,
        r"model\.safetensors in \S+ is not a valid safetensors file: its header .* longer than the file",
    ),
    "header_not_json": (case_header_not_json, r"model\.safetensors in \S+ is not a valid safetensors file: its header is not JSON"),
    "pickle_renamed": (case_pickle_renamed, r"model\.safetensors in \S+ is not a safetensors file: it is a zip or pickle checkpoint"),
    "index_dotdot": (case_index_dotdot, r"model\.safetensors\.index\.json sends tensors to '\.\./.*', outside the model's folder"),
    "index_absolute": (case_index_absolute, r"model\.safetensors\.index\.json sends tensors to '/.*', outside the model's folder"),
    "index_shard_missing": (
        case_index_shard_missing,
        r"model-00002-of-00002\.safetensors, which model\.safetensors\.index\.json lists, is missing",
    ),
    "index_not_a_map": (case_index_not_a_map, r"model\.safetensors\.index\.json in \S+ is not a valid index: its weight_map"),
    "shard_lies": (case_shard_lies, r"model-00002-of-00002\.safetensors in \S+ is not a valid safetensors file"),
}


@pytest.fixture(scope="module")
def hostile(good: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile-weights")
    return {name: build(good, root / name) for name, (build, _) in CASES.items()}


@pytest.fixture(scope="module")
def cli_results(hostile: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("hostile-weights-out")
    names = list(hostile)
    results = run_all([cli_command("export", str(hostile[n]), "-o", str(out / f"{n}.onnx")) for n in names], timeout=120, jobs=3)
    return {"out": out, **dict(zip(names, results))}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_weights_are_refused_before_transformers_reads_them(case: str, hostile: dict[str, Path],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import transformers

    from qgraph.frontend.hf import load_model

    calls: list[Any] = []
    real = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: calls.append(a) or real(*a, **k))
    with pytest.raises(ModelSourceError, match=CASES[case][1]) as e:
        load_model(str(hostile[case]))
    assert "\n" not in str(e.value)
    assert not calls, "transformers read the weights before they were checked"


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_weights_are_refused_by_the_cli(case: str, cli_results: dict[str, Any]) -> None:
    res = cli_results[case]
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert last.startswith("qgraph export: error: ") and re.search(CASES[case][1], last), last
    assert not (cli_results["out"] / f"{case}.onnx").exists()


def test_a_sharded_model_inside_its_folder_loads(good: Path, tmp_path: Path) -> None:
    from qgraph.frontend.hf import load_model

    folder = _sharded(_copy(good, tmp_path / "m"), lambda k, shard: f"shards/{shard}")
    (folder / "shards").mkdir()
    for p in folder.glob("model-*.safetensors"):
        p.rename(folder / "shards" / p.name)
    ref = load_model(str(good))
    got = load_model(str(folder))
    for (name, a), b in zip(ref.state_dict().items(), got.state_dict().values()):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------- the digest
def test_the_weights_digest_covers_exactly_the_files_loading_reads(good: Path, tmp_path: Path) -> None:
    from qgraph.frontend.hf import weights_digest

    folder = _sharded(_copy(good, tmp_path / "m"), lambda k, shard: f"shards/{shard}")
    (folder / "shards").mkdir()
    for p in folder.glob("model-*.safetensors"):
        p.rename(folder / "shards" / p.name)
    before = weights_digest(folder)
    # Files loading never reads: a pickle beside the weights, a README, a tokenizer file.
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    (folder / "README.md").write_text("not read")
    (folder / "tokenizer_config.json").write_text("{}")
    assert weights_digest(folder) == before
    # A shard in a subfolder is read: changing one byte of it changes the digest.
    shard = folder / "shards" / "model-00002-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    changed = weights_digest(folder)
    assert changed != before
    # So are the config and the generation config.
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 3}))
    assert weights_digest(folder) != changed


def test_the_api_keys_on_the_new_digest(good: Path, tmp_path: Path) -> None:
    import qgraph.api as api
    from qgraph import AutoModelForCausalLM

    folder = _copy(good, tmp_path / "m")
    key = AutoModelForCausalLM.from_pretrained(str(folder))._model_digest()
    (folder / "pytorch_model.bin").write_bytes(b"never read")
    assert AutoModelForCausalLM.from_pretrained(str(folder))._model_digest() == key
    assert not hasattr(api, "weights_digest")  # one home: qgraph.frontend.hf


def test_an_escaping_index_is_refused_by_the_cache_key(good: Path, tmp_path: Path) -> None:
    from qgraph import AutoModelForCausalLM

    folder = case_index_dotdot(good, tmp_path / "m")
    with pytest.raises(ModelSourceError, match="outside the model's folder"):
        AutoModelForCausalLM.from_pretrained(str(folder))._model_digest()

"""workers/convert.py + workers/checkpoint.py + `orch convert`: shards reassemble bit-exactly,
bad checkpoints fail clearly, conversion is atomic (kill, Ctrl-C, disk full), incremental and
memory-bounded."""
from __future__ import annotations

import errno
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from orchestrator.errors import CheckpointError, PlanError, RuntimeFailure
from workers import convert as cv
from workers.checkpoint import open_checkpoint
from workers.convert import convert_checkpoint, reassemble, read_shard_manifest, shard_dir_for, verify_shard
from workers.models.config import load_model_config
from workers.models.tiny import write_random_checkpoint, write_tokenizer

REPO = Path(__file__).resolve().parents[1]
VOCAB = 302  # not a multiple of 4: tp=4 pads the vocabulary


# --- checkpoints made with transformers ------------------------------------------------------------

def _hf_checkpoint(out: Path, kind: str, seed: int, **save_kwargs) -> Path:
    """Save a random-weight transformers model of the given kind as safetensors, with a tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, head_dim=16,
                  vocab_size=VOCAB, max_position_embeddings=128)
    if kind == "llama-gqa":
        model = LlamaForCausalLM(LlamaConfig(**common, num_hidden_layers=3, num_key_value_heads=2))
    elif kind == "llama-tied":
        model = LlamaForCausalLM(LlamaConfig(**common, num_hidden_layers=6, num_key_value_heads=4,
                                             tie_word_embeddings=True))
    elif kind == "qwen2-bias":
        model = Qwen2ForCausalLM(Qwen2Config(**common, num_hidden_layers=3, num_key_value_heads=2))
    else:
        raise ValueError(kind)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # transformers initialises norms to ones and biases to zeros: randomise all
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    model.save_pretrained(out, **save_kwargs)
    write_tokenizer(out, VOCAB)
    return out


def _original(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _assert_reassembles(root: Path, tp: int, pp: int, orig: dict[str, torch.Tensor], dtype=None) -> None:
    back = reassemble(root, tp, pp)
    needed = set(orig) - ({"lm_head.weight"} if "lm_head.weight" not in back else set())
    assert set(back) == needed
    for name in needed:
        want = orig[name] if dtype is None else orig[name].to(dtype)
        assert back[name].dtype == want.dtype and torch.equal(back[name], want), name


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("hf")
    return {
        "llama-gqa": _hf_checkpoint(base / "llama-gqa", "llama-gqa", 1),
        "llama-tied": _hf_checkpoint(base / "llama-tied", "llama-tied", 2),
        # several files with a model.safetensors.index.json
        "qwen2-bias": _hf_checkpoint(base / "qwen2-bias", "qwen2-bias", 3, max_shard_size="60KB"),
    }


@pytest.mark.parametrize("kind", ["llama-gqa", "llama-tied", "qwen2-bias"])
def test_shards_reassemble_bit_exactly(hf_models, tmp_path, kind):
    model_dir = hf_models[kind]
    orig = _original(model_dir)
    if kind == "qwen2-bias":
        assert (model_dir / "model.safetensors.index.json").is_file() and len(list(model_dir.glob("*.safetensors"))) > 2
        assert "model.layers.0.self_attn.q_proj.bias" in orig
    if kind == "llama-tied":
        assert "lm_head.weight" not in orig
    for tp in (1, 2, 4):
        for pp in (1, 2, 3):
            res = convert_checkpoint(model_dir, tmp_path / "out", tp, pp)
            assert len(res) == tp * pp and len(res.converted) == tp * pp
            _assert_reassembles(tmp_path / "out", tp, pp, orig)
    # shard contents follow the layout: KV heads replicated at tp=4 with 2 KV heads, vocab padded
    m = read_shard_manifest(shard_dir_for(tmp_path / "out", 4, 3, 3, 0))
    assert m["tensors"]["layers.0.self_attn.qkv_proj.weight"]["shape"] == [(1 + 2) * 16, 64]  # 1 q, 1 k, 1 v head
    assert m["tensors"]["embed_tokens.weight"]["shape"] == [76, 64]
    assert (m["layer_start"], m["layer_stop"]) == ((0, 1) if kind != "llama-tied" else (0, 2))


@pytest.mark.parametrize("arch,overrides", [
    ("mistral", {"sliding_window": 64}),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
])
def test_mistral_and_llama31_rope(tmp_path, arch, overrides):
    model_dir = write_random_checkpoint(tmp_path / "ck", arch=arch, num_hidden_layers=3, seed=4, **overrides)
    convert_checkpoint(model_dir, tmp_path / "out", 2, 3, dtype="bfloat16")
    _assert_reassembles(tmp_path / "out", 2, 3, _original(model_dir), torch.bfloat16)
    cfg = read_shard_manifest(shard_dir_for(tmp_path / "out", 2, 3, 1, 2))["model_config"]
    assert cfg["model_type"] == arch
    if arch == "mistral":
        assert cfg["sliding_window"] == 64
    else:
        assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["rope_scaling"]["factor"] == 8.0


def test_manifest_and_files(hf_models, tmp_path):
    model_dir = hf_models["llama-gqa"]
    convert_checkpoint(model_dir, tmp_path / "out", 2, 2, dtype="bfloat16")
    d = shard_dir_for(tmp_path / "out", 2, 2, 1, 1)
    assert d == tmp_path / "out" / "tp2-pp2" / "rank-1-1"
    m = verify_shard(d)
    assert m["format"] == "orch-shard" and m["dtype"] == "bfloat16" and m["quantization"] == "none"
    assert (m["tp_size"], m["pp_size"], m["tp_rank"], m["pp_rank"]) == (2, 2, 1, 1)
    assert m["model_config"]["num_kv_heads"] == 2
    assert set(m["source_files"]) >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert all(len(h) == 64 for h in m["source_files"].values())
    assert (d / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()
    data = load_file(str(d / "model.safetensors"))
    assert set(data) == set(m["tensors"])
    assert all(t.dtype == torch.bfloat16 for t in data.values())
    assert "lm_head.weight" in data and "norm.weight" in data and "embed_tokens.weight" not in data


def test_dtype_conversion(tmp_path):
    model_dir = write_random_checkpoint(tmp_path / "ck", num_hidden_layers=2)
    orig = _original(model_dir)
    convert_checkpoint(model_dir, tmp_path / "out", 2, 1, dtype="bfloat16")
    _assert_reassembles(tmp_path / "out", 2, 1, orig, torch.bfloat16)
    convert_checkpoint(model_dir, tmp_path / "out", 2, 1, dtype="float16")
    _assert_reassembles(tmp_path / "out", 2, 1, orig, torch.float16)
    # a bfloat16 checkpoint converts back to float32 exactly
    bf = tmp_path / "bf"
    bf.mkdir()
    save_file({k: v.bfloat16() for k, v in orig.items()}, str(bf / "model.safetensors"))
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (bf / f).write_bytes((model_dir / f).read_bytes())
    convert_checkpoint(bf, tmp_path / "out2", 1, 2, dtype="float32")
    _assert_reassembles(tmp_path / "out2", 1, 2, {k: v.bfloat16().float() for k, v in orig.items()})


def test_two_files_without_index(tmp_path):
    model_dir = write_random_checkpoint(tmp_path / "ck", arch="qwen2", num_hidden_layers=2)
    orig = load_file(str(model_dir / "model.safetensors"))
    names = sorted(orig)
    (model_dir / "model.safetensors").unlink()
    save_file({k: orig[k] for k in names[::2]}, str(model_dir / "a.safetensors"))
    save_file({k: orig[k] for k in names[1::2]}, str(model_dir / "b.safetensors"))
    convert_checkpoint(model_dir, tmp_path / "out", 2, 2)
    _assert_reassembles(tmp_path / "out", 2, 2, orig)
    m = read_shard_manifest(shard_dir_for(tmp_path / "out", 2, 2, 0, 0))
    assert {"a.safetensors", "b.safetensors"} <= set(m["source_files"])


# --- incremental ----------------------------------------------------------------------------------

def test_rerun_is_noop_and_new_layout_converts_only_its_shards(tmp_path, caplog):
    model_dir = write_random_checkpoint(tmp_path / "ck", num_hidden_layers=2, seed=5)
    root = tmp_path / "out"
    first = convert_checkpoint(model_dir, root, 2, 1)
    stamps = {d: (d / "model.safetensors").stat().st_mtime_ns for d in first}
    caplog.set_level("INFO", logger="workers.convert")
    again = convert_checkpoint(model_dir, root, 2, 1)
    assert again.noop and again.converted == [] and list(again) == list(first)
    assert "nothing to convert" in caplog.text
    assert stamps == {d: (d / "model.safetensors").stat().st_mtime_ns for d in first}
    # a new layout gets its own shards; the old layout stays
    other = convert_checkpoint(model_dir, root, 1, 2)
    assert len(other.converted) == 2 and all(d.exists() for d in first)
    # a lost shard is the only one redone
    import shutil
    shutil.rmtree(first[1])
    redo = convert_checkpoint(model_dir, root, 2, 1)
    assert redo.converted == [first[1]] and redo.reused == [first[0]]
    # dtype change reconverts the layout's shards in place
    bf = convert_checkpoint(model_dir, root, 2, 1, dtype="bfloat16")
    assert len(bf.converted) == 2 and read_shard_manifest(first[0])["dtype"] == "bfloat16"
    # --force reconverts valid shards; prune removes other layouts
    assert len(convert_checkpoint(model_dir, root, 2, 1, dtype="bfloat16", force=True).converted) == 2
    assert cv.prune_layouts(root, (2, 1)) == [root / "tp1-pp2"]


def test_changed_source_or_damaged_shard_reconverts(tmp_path):
    model_dir = write_random_checkpoint(tmp_path / "ck", num_hidden_layers=2, seed=6)
    root = tmp_path / "out"
    dirs = convert_checkpoint(model_dir, root, 2, 1)
    # a flipped byte inside a shard is caught by verify=True (the default check is manifest + sizes)
    w = dirs[0] / "model.safetensors"
    raw = bytearray(w.read_bytes())
    raw[-5] ^= 0xFF
    w.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="sha256"):
        verify_shard(dirs[0])
    assert convert_checkpoint(model_dir, root, 2, 1).noop
    assert convert_checkpoint(model_dir, root, 2, 1, verify=True).converted == [dirs[0]]
    verify_shard(dirs[0])
    # a missing manifest makes the shard invalid
    (dirs[1] / "manifest.json").unlink()
    assert convert_checkpoint(model_dir, root, 2, 1).converted == [dirs[1]]
    # new weights (same names and shapes) -> new source hashes -> every shard redone
    orig = load_file(str(model_dir / "model.safetensors"))
    new = {k: torch.randn(v.shape) for k, v in orig.items()}
    save_file(new, str(model_dir / "model.safetensors"))
    assert len(convert_checkpoint(model_dir, root, 2, 1).converted) == 2
    _assert_reassembles(root, 2, 1, new)


def test_shards_root_key_follows_content(tmp_path):
    a = write_random_checkpoint(tmp_path / "a", num_hidden_layers=1, seed=1)
    b = write_random_checkpoint(tmp_path / "b", num_hidden_layers=1, seed=1)
    c = write_random_checkpoint(tmp_path / "c", num_hidden_layers=1, seed=2)
    ra, rb, rc = (cv.shards_root(tmp_path / "art", d) for d in (a, b, c))
    assert ra == rb != rc and ra.parent == tmp_path / "art" / "shards" and len(ra.name) == 16
    assert (tmp_path / "art" / "shards" / cv.HASH_CACHE).is_file()


# --- bad input ------------------------------------------------------------------------------------

def _nothing_written(root: Path) -> bool:
    return not root.exists() or not any(p.name.startswith("rank-") or ".tmp." in p.name for p in root.rglob("*"))


@pytest.fixture
def small(tmp_path) -> Path:
    return write_random_checkpoint(tmp_path / "ck", num_hidden_layers=2, seed=9)


def _rewrite(model_dir: Path, fn) -> None:
    t = load_file(str(model_dir / "model.safetensors"))
    fn(t)
    save_file(t, str(model_dir / "model.safetensors"))


def test_missing_tensor(small, tmp_path):
    _rewrite(small, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        convert_checkpoint(small, tmp_path / "out", 2, 1)
    assert _nothing_written(tmp_path / "out")


def test_shape_not_matching_config(small, tmp_path):
    cfg = json.loads((small / "config.json").read_text())
    cfg["intermediate_size"] = 256
    (small / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight' "
                                              r"has shape \[\d+, \d+\], config\.json implies"):
        convert_checkpoint(small, tmp_path / "out", 1, 1)
    assert _nothing_written(tmp_path / "out")


def test_truncated_file(small, tmp_path):
    f = small / "model.safetensors"
    os.truncate(f, f.stat().st_size - 100)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated safetensors file"):
        convert_checkpoint(small, tmp_path / "out", 1, 1)
    os.truncate(f, 5)
    with pytest.raises(CheckpointError, match="truncated"):
        convert_checkpoint(small, tmp_path / "out", 1, 1)
    assert _nothing_written(tmp_path / "out")


def test_corrupt_header(small, tmp_path):
    f = small / "model.safetensors"
    raw = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    raw[8:8 + 16] = os.urandom(8).hex().encode()[:16]  # garbage at the start of the JSON
    f.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt safetensors header"):
        convert_checkpoint(small, tmp_path / "out", 1, 1)
    f.write_bytes(struct.pack("<Q", 1 << 40) + bytes(raw[8:]))
    with pytest.raises(CheckpointError, match="corrupt or truncated safetensors header"):
        convert_checkpoint(small, tmp_path / "out", 1, 1)
    assert _nothing_written(tmp_path / "out")


def test_unsupported_dtype(small, tmp_path):
    def to_int(t):
        t["model.norm.weight"] = (t["model.norm.weight"] * 100).to(torch.int32)
    _rewrite(small, to_int)
    with pytest.raises(CheckpointError, match=r"tensor 'model\.norm\.weight' has unsupported dtype I32"):
        convert_checkpoint(small, tmp_path / "out", 1, 1)
    with pytest.raises(PlanError, match="model.dtype='int8'"):
        cv.resolve_dtype("int8", load_model_config(small))
    assert _nothing_written(tmp_path / "out")


def test_unreadable_paths(small, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        convert_checkpoint(tmp_path / "nope", tmp_path / "out", 1, 1)
    with pytest.raises(CheckpointError, match="not a directory"):
        convert_checkpoint(small / "config.json", tmp_path / "out", 1, 1)
    f = small / "model.safetensors"
    f.unlink()
    f.mkdir()  # a weight "file" that cannot be read
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read"):
        convert_checkpoint(small, tmp_path / "out", 1, 1)
    f.rmdir()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors files"):
        convert_checkpoint(small, tmp_path / "out", 1, 1)
    assert _nothing_written(tmp_path / "out")


def test_unsupported_architecture_and_layout(small, tmp_path):
    cfg = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(CheckpointError, match=r"unsupported architecture 'GPT2LMHeadModel'; supported: .*LlamaForCausalLM"):
        convert_checkpoint(small, tmp_path / "out", 1, 1)
    (small / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PlanError, match="parallelism.tensor=3"):
        convert_checkpoint(small, tmp_path / "out", 3, 1)
    with pytest.raises(PlanError, match=r"build.quantization='fp8' is not yet supported .*supported: none"):
        convert_checkpoint(small, tmp_path / "out", 1, 1, quantization="fp8")
    assert _nothing_written(tmp_path / "out")


def test_no_space_mid_write(small, tmp_path, monkeypatch):
    """A disk that fills up half-way through a shard (ENOSPC from a write) leaves no temp, no shard."""
    real, calls = os.pwrite, [0]

    def pwrite(fd, buf, off):
        calls[0] += 1
        if calls[0] > 12:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, buf, off)

    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(RuntimeFailure, match=r"no space left on device writing shard .*rank-\d-\d"):
        convert_checkpoint(small, tmp_path / "out", 2, 1)
    monkeypatch.undo()
    layout = tmp_path / "out" / "tp2-pp1"
    assert not [p for p in layout.iterdir() if ".tmp." in p.name]
    for d in layout.glob("rank-*"):  # shards finished before the disk filled are whole
        verify_shard(d)
    assert len(convert_checkpoint(small, tmp_path / "out", 2, 1).converted) >= 1


def test_no_space_real_tmpfs(small, tmp_path):
    """On a real, too small filesystem the converter refuses before writing anything."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        with pytest.raises(RuntimeFailure, match=r"no space left on device .* need [\d.]+ GB"):
            convert_checkpoint(small, mnt / "out", 1, 1)
        assert not list((mnt / "out" / "tp1-pp1").iterdir())
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


# --- interruption ---------------------------------------------------------------------------------

def _convert_proc(model_dir: Path, root: Path, tp: int, pp: int, delay: float) -> subprocess.Popen:
    code = f"from workers.convert import convert_checkpoint; convert_checkpoint({str(model_dir)!r}, {str(root)!r}, {tp}, {pp})"
    env = {**os.environ, cv.DELAY_ENV: str(delay)}
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env)


def _wait_for(pred, proc: subprocess.Popen, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert proc.poll() is None, "converter exited before the condition held"
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_sigkill_mid_conversion_then_rerun(tmp_path):
    model_dir = write_random_checkpoint(tmp_path / "ck", num_hidden_layers=4, seed=11)
    orig = _original(model_dir)
    root = tmp_path / "out"
    layout = root / "tp2-pp2"
    proc = _convert_proc(model_dir, root, 2, 2, delay=0.05)
    try:
        _wait_for(lambda: (layout / "rank-0-0").exists() and any(".tmp." in p.name for p in layout.iterdir()), proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    visible = sorted(layout.glob("rank-*"))
    assert 1 <= len(visible) < 4
    for d in visible:
        verify_shard(d)  # everything that looks like a shard is a whole, valid one
    assert any(".tmp." in p.name for p in layout.iterdir())  # the half-written one is hidden
    res = convert_checkpoint(model_dir, root, 2, 2)
    assert sorted(res.reused) == visible and len(res.converted) == 4 - len(visible)
    assert not any(".tmp." in p.name for p in layout.iterdir())
    _assert_reassembles(root, 2, 2, orig)


@pytest.mark.slow
def test_sigkill_at_random_moments(tmp_path):
    """Kill at 6 random moments of one conversion; after each, every visible shard is valid."""
    import random

    model_dir = write_random_checkpoint(tmp_path / "ck", num_hidden_layers=4, seed=13)
    root, layout = tmp_path / "out", tmp_path / "out" / "tp2-pp2"
    rng = random.Random(7)
    for _ in range(6):
        proc = _convert_proc(model_dir, root, 2, 2, delay=0.01)
        _wait_for(lambda: layout.exists(), proc)
        time.sleep(rng.uniform(0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for d in layout.glob("rank-*"):
            verify_shard(d)
    convert_checkpoint(model_dir, root, 2, 2)
    _assert_reassembles(root, 2, 2, _original(model_dir))


def test_ctrl_c_cleans_temp_dir(tmp_path):
    """SIGINT to `orch convert` mid-shard: exit 130, temp removed, only whole shards visible."""
    model_dir = write_random_checkpoint(tmp_path / "ck", num_hidden_layers=4, seed=12)
    topo = tmp_path / "cluster.yaml"
    topo.write_text(textwrap.dedent(f"""\
        name: conv
        model: {{path: {model_dir}, dtype: float32}}
        parallelism: {{tensor: 2, pipeline: 2}}
        build: {{artifacts: {tmp_path / 'art'}}}
    """))
    env = {**os.environ, cv.DELAY_ENV: "0.03"}
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "convert", str(topo), "--json"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    shards = tmp_path / "art" / "shards"
    tmp_seen = lambda: any(".tmp." in p.name for p in shards.glob("*/tp2-pp2/*"))  # noqa: E731
    try:
        _wait_for(tmp_seen, proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err.decode()
    assert not tmp_seen()
    for d in shards.glob("*/tp2-pp2/rank-*"):
        verify_shard(d)
    # then the command finishes the job, and a second run is a no-op that says so
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "convert", str(topo), "--json"],
                         cwd=REPO, capture_output=True, check=True)
    first = json.loads(out.stdout)
    assert len(first["shards"]) == 4 and first["converted"]
    again = subprocess.run([sys.executable, "-m", "orchestrator.cli", "convert", str(topo)],
                           cwd=REPO, capture_output=True, text=True, check=True)
    assert "nothing to convert" in again.stdout
    _assert_reassembles(Path(first["root"]), 2, 2, _original(model_dir))


def test_cli_prune_and_uri_artifacts(small, tmp_path):
    from orchestrator.cli import main
    from orchestrator.commands.convert import convert_topology
    from orchestrator.errors import TopologyError
    from orchestrator.topology import parse_topology

    text = f"name: c\nmodel: {{path: {small}, dtype: bfloat16}}\nparallelism: {{tensor: 2}}\nbuild: {{artifacts: ART}}\n"
    with pytest.raises(TopologyError, match=r":4: build.artifacts: 's3://b/x' is a URI"):
        convert_topology(parse_topology(text.replace("ART", "s3://b/x"), str(tmp_path / "c.yaml")))
    bad = parse_topology(text.replace("ART", str(tmp_path / "art")).replace("tensor: 2", "tensor: 3"), "c.yaml")
    with pytest.raises(PlanError, match=r"^c\.yaml:3: parallelism\.tensor=3 must divide"):
        convert_topology(bad)
    (tmp_path / "c.yaml").write_text(text.replace("ART", str(tmp_path / "art")))
    root, res = convert_topology(parse_topology((tmp_path / "c.yaml").read_text(), str(tmp_path / "c.yaml")),
                                 progress=False)
    assert root == cv.shards_root(tmp_path / "art", small) and len(res.converted) == 2
    convert_checkpoint(small, root, 1, 1)
    assert main(["convert", str(tmp_path / "c.yaml"), "--prune", "--json"]) == 0
    assert sorted(p.name for p in root.glob("tp*")) == ["tp2-pp1"]
    assert main(["convert", str(tmp_path / "c.yaml"), "--json"]) == 0


# --- memory ---------------------------------------------------------------------------------------

# VmHWM (this process image's peak RSS), not getrusage's ru_maxrss: after fork+exec the latter
# starts from the parent's RSS, i.e. pytest's, which holds the generated checkpoint.
RSS_SCRIPT = """
import json, sys, psutil
from workers.checkpoint import open_checkpoint
from workers.convert import convert_checkpoint
def hwm():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024
open_checkpoint(sys.argv[1])
before = max(hwm(), psutil.Process().memory_info().rss)
res = convert_checkpoint(sys.argv[1], sys.argv[2], int(sys.argv[3]), 1, dtype=sys.argv[4])
print(json.dumps({"before": before, "peak": hwm(), "bytes": res.bytes_written}))
"""


def test_peak_rss_is_bounded(tmp_path):
    """A ~520 MB float32 checkpoint converts with peak RSS well below its size."""
    model_dir = write_random_checkpoint(tmp_path / "ck", hidden_size=1024, intermediate_size=4096,
                                        vocab_size=32000, num_hidden_layers=4, num_attention_heads=8,
                                        num_key_value_heads=8, head_dim=128)
    ckpt = open_checkpoint(model_dir)
    total = sum(t.nbytes for t in ckpt.tensors.values())
    largest = max(t.nbytes for t in ckpt.tensors.values())
    assert total > 400e6 and largest == 32000 * 1024 * 4
    for tp, dtype in ((1, "float32"), (2, "bfloat16")):
        out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(model_dir), str(tmp_path / "out"), str(tp), dtype],
                             cwd=REPO, capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        extra = r["peak"] - r["before"]
        print(f"tp={tp} {dtype}: rss before {r['before'] / 1e6:.0f} MB, peak {r['peak'] / 1e6:.0f} MB, "
              f"extra {extra / 1e6:.0f} MB for {r['bytes'] / 1e6:.0f} MB written (largest tensor {largest / 1e6:.0f} MB)")
        # chunked streaming: a few 16 MiB chunks, well under one largest tensor (131 MB)
        assert extra < 0.75 * largest, "conversion held about a whole tensor in memory"

"""Topology parsing and validation: every user mistake is one line naming file, line and key path."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from orchestrator.errors import TopologyError
from orchestrator.topology import load_topology, parse_topology, schema_reference
from orchestrator.validation import validate_topology
from tests.fixtures.model_shapes import LLAMA31, write_shape_dir
from workers.models.tiny import tiny_config

BASE = """\
name: demo
model:
  path: MODEL
  dtype: bfloat16
parallelism:
  tensor: 2
  pipeline: 2
nodes:
  - name: gpu-a
    address: 10.0.0.11
    gpus: 8
  - name: bigmem
    address: 10.0.0.20
    gpus: 0
    memory_gb: 1024
    roles: [convert]
device: auto
build:
  quantization: none
  artifacts: ./.orch/artifacts
serve:
  host: 127.0.0.1
  port: 50051
  max_num_seqs: 256
  max_seq_len: 4096
  kv_cache_fraction: 0.9
"""


def mutate(line_no: int, new: str | None, text: str = BASE) -> str:
    """BASE with 1-based line `line_no` replaced by `new` (None deletes it)."""
    lines = text.splitlines()
    if new is None:
        del lines[line_no - 1]
    else:
        lines[line_no - 1] = new
    return "\n".join(lines) + "\n"


def add(text: str, extra: str) -> str:
    return text + extra + "\n"


# (case id, yaml text, line, key path, words the message must contain)
SCHEMA_CASES = [
    ("tensor-not-int", mutate(6, "  tensor: two"), 6, "parallelism.tensor", ["positive integer", "got 'two'"]),
    ("tensor-typo", mutate(6, "  tensr: 2"), 6, "parallelism.tensr", ["unknown key", "did you mean 'tensor'?"]),
    ("pipeline-zero", mutate(7, "  pipeline: 0"), 7, "parallelism.pipeline", ["positive integer", "got 0"]),
    ("tensor-bool", mutate(6, "  tensor: yes"), 6, "parallelism.tensor", ["positive integer", "got True"]),
    ("dtype", mutate(4, "  dtype: bf16"), 4, "model.dtype", ["float32, float16, bfloat16", "got 'bf16'"]),
    ("device", mutate(17, "device: gpu"), 17, "device", ["auto, cuda, cpu", "got 'gpu'"]),
    ("gpus-negative", mutate(11, "    gpus: -1"), 11, "nodes[0].gpus", ["non-negative integer", "got -1"]),
    ("role-typo", mutate(16, "    roles: [convrt]"), 16, "nodes[1].roles[0]", ["'convert' or 'serve'"]),
    ("quantization", mutate(19, "  quantization: int3"), 19, "build.quantization", ["none, fp8", "'int3'"]),
    ("port-range", mutate(23, "  port: 70000"), 23, "serve.port", ["1-65535", "got 70000"]),
    ("fraction-range", mutate(26, "  kv_cache_fraction: 1.5"), 26, "serve.kv_cache_fraction", ["(0, 1]", "1.5"]),
    ("max-num-seqs", mutate(24, "  max_num_seqs: 0"), 24, "serve.max_num_seqs", ["positive integer"]),
    ("missing-path", mutate(3, None), 2, "model.path", ["missing required key"]),
    ("top-level-typo", mutate(21, "sevre:"), 21, "sevre", ["unknown key", "did you mean 'serve'?"]),
    ("node-key-typo", mutate(10, "    addres: 10.0.0.11"), 10, "nodes[0].addres", ["did you mean 'address'?"]),
    ("duplicate-node", mutate(12, "  - name: gpu-a"), 12, "nodes[1].name", ["duplicate node name 'gpu-a'"]),
    ("duplicate-address", mutate(13, "    address: 10.0.0.11"), 13, "nodes[1].address", ["duplicate address"]),
    ("block-size", add(BASE, "  block_size: 12"), 27, "serve.block_size", ["power of two", "12"]),
    ("metrics-port", add(BASE, "  metrics_port: 50051"), 27, "serve.metrics_port", ["must differ from serve.port"]),
    ("batched-tokens", add(BASE, "  max_num_batched_tokens: 100"), 27, "serve.max_num_batched_tokens",
     ["at least serve.max_num_seqs (256)"]),
    ("name", mutate(1, "name: Demo_1"), 1, "name", ["lowercase", "'Demo_1'"]),
    ("duplicate-key", mutate(7, "  tensor: 4"), 7, "parallelism.tensor", ["duplicate key", "first at line 6"]),
    ("section-not-mapping", mutate(5, "parallelism: 4", mutate(6, None, mutate(7, None))), 5, "parallelism",
     ["must be a mapping", "got 4"]),
    ("resources-reserved", mutate(16, "    resources: {GPU: 2}"), 16, "nodes[1].resources",
     ["built-in Ray resource"]),
    ("resource-value", mutate(16, "    resources: {bigmem: lots}"), 16, "nodes[1].resources.bigmem",
     ["valid number", "'lots'"]),
    ("cuda-without-gpus", mutate(11, "    gpus: 0", mutate(17, "device: cuda")), 17, "device",
     ["no node lists gpus"]),
]


@pytest.mark.parametrize("text,line,key,words", [c[1:] for c in SCHEMA_CASES], ids=[c[0] for c in SCHEMA_CASES])
def test_bad_topology_names_file_line_and_key(text: str, line: int, key: str, words: list[str]) -> None:
    with pytest.raises(TopologyError) as ei:
        parse_topology(text.replace("MODEL", "./m"), "cluster.yaml")
    msg = str(ei.value)
    assert msg.startswith(f"cluster.yaml:{line}: {key}: "), msg
    for w in words:
        assert w in msg, (w, msg)
    assert "Traceback" not in msg and "pydantic" not in msg


def test_exact_message_of_the_issue_example() -> None:
    with pytest.raises(TopologyError) as ei:
        parse_topology(mutate(6, "  tensor: two").replace("MODEL", "m"), "cluster.yaml")
    assert str(ei.value) == "cluster.yaml:6: parallelism.tensor: must be a positive integer, got 'two'"


def test_several_mistakes_are_reported_in_line_order() -> None:
    text = mutate(23, "  port: -5", mutate(6, "  tensor: two"))
    msg = str(pytest.raises(TopologyError, parse_topology, text, "c.yaml").value)
    lines = msg.splitlines()
    assert lines[0].startswith("c.yaml:6: parallelism.tensor:") and lines[1].startswith("c.yaml:23: serve.port:")


@pytest.mark.parametrize("text,line,words", [
    ("name: x\nmodel:\n  path: [a\n", 3, ["invalid YAML"]),
    ("name: x\nmodel:\n\tpath: a\n", 3, ["invalid YAML"]),
    ("", 1, ["empty"]),
    ("- name: x\n", 1, ["mapping"]),
])
def test_yaml_syntax_errors_have_a_line(text: str, line: int, words: list[str]) -> None:
    msg = str(pytest.raises(TopologyError, parse_topology, text, "bad.yaml").value)
    assert msg.startswith(f"bad.yaml:{line}: "), msg
    assert all(w in msg for w in words), msg


def test_load_topology_resolves_paths_and_defaults(tmp_path: Path) -> None:
    sub = tmp_path / "conf"
    sub.mkdir()
    f = sub / "cluster.yaml"
    f.write_text("name: t\nmodel:\n  path: ../models/m\nserve:\n  port: 50100\n")
    topo = load_topology(f)
    assert topo.model.path == (tmp_path / "models" / "m").resolve()
    assert topo.source_path == f.resolve()
    assert topo.build.artifacts == str((sub / ".orch" / "artifacts").resolve())
    assert (topo.serve.metrics_port, topo.serve.block_size, topo.serve.max_num_batched_tokens) == (51100, 16, 2048)
    assert (topo.device, topo.nodes, topo.parallelism.tensor, topo.model.dtype) == ("auto", [], 1, "bfloat16")
    high = parse_topology("name: t\nmodel: {path: m}\nserve: {port: 65000}\n", "x.yaml")
    assert high.serve.metrics_port == 64000


def test_missing_file_is_a_topology_error(tmp_path: Path) -> None:
    msg = str(pytest.raises(TopologyError, load_topology, tmp_path / "nope.yaml").value)
    assert "nope.yaml" in msg and "no such file" in msg


def test_topology_hash_ignores_comments_and_order_but_not_values() -> None:
    rng = random.Random()
    port = rng.randrange(1024, 60000)
    a = parse_topology(f"name: h\nmodel: {{path: m}}\nserve: {{port: {port}, max_num_seqs: 8}}\n", "a.yaml")
    b = parse_topology(f"# comment\nserve:\n  max_num_seqs: 8\n  port: {port}\nmodel:\n  path: m\nname: h\n", "a.yaml")
    c = parse_topology(f"name: h\nmodel: {{path: m}}\nserve: {{port: {port + 1}, max_num_seqs: 8}}\n", "a.yaml")
    assert a.topology_hash() == b.topology_hash() != c.topology_hash()
    assert len(a.topology_hash()) == 64


def test_line_of_falls_back_to_nearest_parent() -> None:
    topo = parse_topology(BASE.replace("MODEL", "m"), "c.yaml")
    assert topo.line_of("nodes[1].memory_gb") == 15
    assert topo.line_of("serve.block_size") == 21  # absent: the serve mapping
    assert topo.line_of("nodes[1].resources") == 12
    assert topo.where("parallelism.tensor") == "c.yaml:6"


def test_schema_reference_lists_every_key() -> None:
    ref = schema_reference()
    for key in ("parallelism.tensor", "nodes[].roles", "serve.metrics_port", "serve.block_size",
                "serve.max_num_batched_tokens", "build.artifacts", "model.dtype"):
        assert key in ref


# ---------------------------------------------------------------- checks against the model
@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    """A shape-only tiny model: 8 heads, 2 KV heads, 4 layers."""
    return write_shape_dir(tmp_path / "tiny", tiny_config("llama", num_attention_heads=8, num_key_value_heads=2,
                                                          head_dim=8))


def _validate(text: str, model: Path, shape_only: bool = True):
    topo = parse_topology(text.replace("MODEL", str(model)), "cluster.yaml")
    return validate_topology(topo, shape_only=shape_only)


def sub(*pairs: tuple[str, str]) -> str:
    """BASE with each (old, new) text replaced once."""
    text = BASE
    for old, new in pairs:
        assert old in text, old
        text = text.replace(old, new, 1)
    return text


SERVE_TOO = ("roles: [convert]", "roles: [convert, serve]")
MODEL_CASES = [
    ("tensor-divides-heads", sub(("tensor: 2", "tensor: 3")), 6, "parallelism.tensor",
     ["3 must divide the 8 attention heads"]),
    ("pipeline-vs-layers", sub(("pipeline: 2", "pipeline: 5")), 7, "parallelism.pipeline",
     ["exceeds the model's 4 layers"]),
    ("not-enough-gpus", sub(("tensor: 2", "tensor: 4"), ("pipeline: 2", "pipeline: 4")), 5, "parallelism",
     ["needs 16 GPUs", "gpu-a: 8"]),
    ("tp-group-fits-node", sub(("tensor: 2", "tensor: 8"), ("pipeline: 2", "pipeline: 1"), ("gpus: 8", "gpus: 4"),
                               ("gpus: 0", "gpus: 4"), SERVE_TOO), 6, "parallelism.tensor",
     ["must fit in one node", "has 4"]),
    ("pipeline-groups", sub(("tensor: 2", "tensor: 4"), ("gpus: 8", "gpus: 6"), ("gpus: 0", "gpus: 2"), SERVE_TOO),
     7, "parallelism.pipeline", ["2 whole tensor-parallel groups", "only 1"]),
    ("no-convert-node", sub(("gpus: 8", "gpus: 8\n    roles: [serve]"), ("roles: [convert]", "roles: [serve]")),
     8, "nodes", ["no node can convert"]),
    ("no-serving-node", sub(("gpus: 8", "gpus: 8\n    roles: [convert]")), 8, "nodes", ["no node can serve"]),
    ("max-seq-len-vs-model", BASE, 25, "serve.max_seq_len", ["exceeds the model's max_position_embeddings (2048)"]),
]


@pytest.mark.parametrize("text,line,key,words", [c[1:] for c in MODEL_CASES], ids=[c[0] for c in MODEL_CASES])
def test_bad_topology_against_model(tiny_dir: Path, text: str, line: int, key: str, words: list[str]) -> None:
    if key != "serve.max_seq_len":
        text = text.replace("max_seq_len: 4096", "max_seq_len: 1024")
    msg = str(pytest.raises(TopologyError, _validate, text, tiny_dir).value)
    assert msg.startswith(f"cluster.yaml:{line}: {key}: "), msg
    for w in words:
        assert w in msg, (w, msg)


def test_model_path_problems(tmp_path: Path, tiny_dir: Path) -> None:
    msg = str(pytest.raises(TopologyError, _validate, BASE, tmp_path / "absent").value)
    assert msg.startswith("cluster.yaml:3: model.path: ") and "does not exist" in msg
    empty = tmp_path / "empty"
    empty.mkdir()
    msg = str(pytest.raises(TopologyError, _validate, BASE, empty).value)
    assert msg.startswith("cluster.yaml:3: model.path: ") and "config.json" in msg
    msg = str(pytest.raises(TopologyError, _validate, BASE, tiny_dir, False).value)
    assert msg.startswith("cluster.yaml:3: model.path: ") and "*.safetensors" in msg and "--shape-only" in msg
    (tiny_dir / "model.safetensors").write_bytes(b"x" * random.randrange(8, 64))
    msg = str(pytest.raises(TopologyError, _validate, BASE, tiny_dir, False).value)
    assert msg.startswith("cluster.yaml:3: model.path: ") and "tokenizer.json" in msg


def test_model_that_does_not_fit_is_refused_with_numbers(tmp_path: Path) -> None:
    m = write_shape_dir(tmp_path / "70b", LLAMA31["70b"])
    text = mutate(6, "  tensor: 1", mutate(7, "  pipeline: 1"))
    msg = str(pytest.raises(TopologyError, _validate, text, m).value)
    assert msg.startswith("cluster.yaml:5: parallelism: the model does not fit"), msg
    weights = 2 * 70_553_706_496  # Llama-3.1-70B parameters in bfloat16
    assert f"{weights / 2**30:.2f} GiB of weights" in msg and "72.00 GiB" in msg


def test_valid_topology_with_kv_replication(tiny_dir: Path) -> None:
    """tensor 4 over 2 KV heads replicates each KV head on 2 ranks: valid."""
    cfg, plan = _validate(sub(("tensor: 2", "tensor: 4"), ("max_seq_len: 4096", "max_seq_len: 2048")), tiny_dir)
    assert (cfg.num_kv_heads, plan.tensor, plan.pipeline) == (2, 4, 2)
    assert plan.convert_node == "bigmem"
    assert any("replicated on 2 ranks" in n for n in plan.notes)

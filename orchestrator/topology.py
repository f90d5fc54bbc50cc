"""Topology YAML: the schema, parsing with `file:line: key: problem` errors, and a content hash.

Parsing checks the file on its own (syntax, keys, types, ranges, relations between keys).
Checks against the model's config.json and the node inventory live in orchestrator/validation.py.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from orchestrator.errors import TopologyError

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
ROLES = ("convert", "serve")
RESERVED_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
NODE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
METRICS_PORT_OFFSET = 1000

PosInt = Annotated[int, Field(gt=0)]
Port = Annotated[int, Field(ge=1, le=65535)]


class _Section(BaseModel):
    """Base of every mapping in the file: strict types, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=False)


class ModelSection(_Section):
    path: Annotated[Path, Field(strict=False)] = Field(
        description="a directory path; a Hugging Face checkpoint (config.json, *.safetensors, "
        "tokenizer.json), relative to the topology file")
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "bfloat16", description="one of float32, float16, bfloat16")


class Parallelism(_Section):
    tensor: PosInt = Field(1, description="a positive integer; GPUs per tensor-parallel group")
    pipeline: PosInt = Field(1, description="a positive integer; pipeline stages")


class Node(_Section):
    name: str = Field(description="a string; the node's name (letters, digits, '.', '_', '-')")
    address: str = Field(description="a string; the Ray node IP address or label selector")
    gpus: Annotated[int, Field(ge=0)] = Field(0, description="a non-negative integer; GPUs on the node")
    gpu_memory_gb: Annotated[float, Field(gt=0)] = Field(
        80.0, description="a positive number; GiB of memory per GPU")
    memory_gb: Annotated[float, Field(gt=0)] | None = Field(
        None, description="a positive number; GiB of host RAM")
    roles: list[Literal["convert", "serve"]] = Field(
        default_factory=list,
        description="a list of roles from: convert, serve; no roles: the node may do both")
    resources: dict[str, Annotated[float, Field(ge=0)]] = Field(
        default_factory=dict, description="a mapping of Ray custom resource name to a non-negative number")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NODE_NAME_RE.match(v):
            raise ValueError(f"must be a node name of letters, digits, '.', '_' or '-', got {v!r}")
        return v

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be a non-empty Ray node address or label selector")
        return v

    @field_validator("resources")
    @classmethod
    def _resources(cls, v: dict[str, float]) -> dict[str, float]:
        for k in v:
            if k in RESERVED_RESOURCES:
                raise ValueError(f"{k!r} is a built-in Ray resource; use gpus / memory_gb instead")
        return v

    def can(self, role: str) -> bool:
        """Whether this node may take `role` (a node without roles may take any)."""
        return not self.roles or role in self.roles


class BuildSection(_Section):
    quantization: Literal["none", "fp8", "int8_wo", "int4_wo"] = Field(
        "none", description="one of none, fp8, int8_wo, int4_wo")
    artifacts: str = Field("./.orch/artifacts", description="a string; the artifact store directory (relative to "
                           "the topology file) or URI")

    @field_validator("artifacts")
    @classmethod
    def _nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be a non-empty directory or URI")
        return v


class ServeSection(_Section):
    host: str = Field("127.0.0.1", description="a string; the host or IP address to listen on")
    port: Port = Field(50051, description="a TCP port number (1-65535)")
    metrics_port: Port | None = Field(
        None, description="a TCP port number (1-65535); Prometheus metrics, default port + 1000 "
        "(port - 1000 when that exceeds 65535)")
    max_num_seqs: PosInt = Field(256, description="a positive integer; sequences running at once")
    max_seq_len: PosInt = Field(4096, description="a positive integer; prompt + generated tokens per sequence")
    max_num_batched_tokens: PosInt = Field(
        2048, description="a positive integer; tokens per engine step (prefill is chunked to fit)")
    kv_cache_fraction: Annotated[float, Field(gt=0, le=1)] = Field(
        0.9, description="a number in (0, 1]; share of GPU memory for weights, activations and KV cache")
    block_size: PosInt = Field(16, description="a power of two; tokens per KV-cache block")

    @field_validator("block_size")
    @classmethod
    def _pow2(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(f"must be a power of two, got {v}")
        return v

    def model_post_init(self, _ctx: Any) -> None:
        if self.metrics_port is None:
            up = self.port + METRICS_PORT_OFFSET
            self.metrics_port = up if up <= 65535 else self.port - METRICS_PORT_OFFSET


class Topology(_Section):
    """A parsed topology file."""

    name: str = Field(description="a lowercase name of letters, digits and '-' (at most 63 characters)")
    model: ModelSection = Field(description="a mapping with keys path, dtype")
    parallelism: Parallelism = Field(default_factory=Parallelism, description="a mapping with keys tensor, pipeline")
    nodes: list[Node] = Field(default_factory=list, description="a list of node mappings; absent: this machine")
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="one of auto, cuda, cpu")
    build: BuildSection = Field(default_factory=BuildSection, description="a mapping with keys quantization, artifacts")
    serve: ServeSection = Field(default_factory=ServeSection, description="a mapping of serving settings")

    _source_path: Path | None = PrivateAttr(None)
    _filename: str = PrivateAttr("<topology>")
    _lines: dict[tuple, tuple[int, int]] = PrivateAttr(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"must be a lowercase name of letters, digits and '-' (at most 63), got {v!r}")
        return v

    @property
    def source_path(self) -> Path | None:
        """The YAML file this topology was read from (None when parsed from text)."""
        return self._source_path

    @property
    def filename(self) -> str:
        """The file name used in error messages."""
        return self._filename

    def line_of(self, key: str) -> int:
        """Line of a dotted key path (`nodes[1].gpus`), or of its nearest parent present in the file."""
        path = _split_key(key)
        while path:
            hit = _lookup(self._lines, path)
            if hit:
                return hit[0]
            path = path[:-1]
        return 1

    def where(self, key: str) -> str:
        """`file:line` of a dotted key path."""
        return f"{self._filename}:{self.line_of(key)}"

    def error(self, key: str, message: str) -> TopologyError:
        """A TopologyError `file:line: key: message` for a dotted key path."""
        return TopologyError(f"{self.where(key)}: {key}: {message}")

    def topology_hash(self) -> str:
        """sha256 of the canonical JSON of the parsed topology (comments and key order do not count)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


# ---------------------------------------------------------------------------------------- parsing
def load_topology(path: Path | str) -> Topology:
    """Read and parse a topology YAML file (schema checks only; see validation.validate_topology)."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise TopologyError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise TopologyError(f"{path}: is a directory, expected a topology YAML file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TopologyError(f"{path}: cannot read: {e}") from None
    topo = parse_topology(text, str(path), base_dir=p.resolve().parent)
    topo._source_path = p.resolve()
    return topo


def parse_topology(text: str, filename: str = "<topology>", base_dir: Path | str | None = None) -> Topology:
    """Parse topology YAML text; relative paths resolve against base_dir (default: filename's directory)."""
    if base_dir is None:
        base_dir = Path(filename).resolve().parent if filename != "<topology>" else Path.cwd()
    data, lines = _load_yaml(text, filename)
    if data is None:
        raise TopologyError(f"{filename}:1: the file is empty; expected a mapping with keys "
                            + ", ".join(Topology.model_fields))
    if not isinstance(data, dict):
        raise TopologyError(f"{filename}:1: the top level must be a mapping of keys, got {type(data).__name__}")
    try:
        topo = Topology.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        typos = {tuple(err["loc"][:-1]) + (hint,) for err in errors if err["type"] == "extra_forbidden"
                 for hint in _suggest(tuple(err["loc"]))}
        msgs = sorted({_render_error(err, lines, filename) for err in errors
                       if not (err["type"] == "missing" and tuple(err["loc"]) in typos)})
        raise TopologyError("\n".join(m for _, m in msgs)) from None
    base = Path(base_dir)
    topo.model.path = _resolve_path(topo.model.path, base)
    if "://" not in topo.build.artifacts:
        topo.build.artifacts = str(_resolve_path(Path(topo.build.artifacts), base))
    topo._filename = filename
    topo._lines = lines
    _check_relations(topo)
    return topo


def _resolve_path(p: Path, base: Path) -> Path:
    p = p.expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def _check_relations(topo: Topology) -> None:
    """Rules that relate several keys of the file to each other."""
    s = topo.serve
    if s.metrics_port == s.port:
        raise topo.error("serve.metrics_port", f"must differ from serve.port ({s.port})")
    if s.max_num_batched_tokens < s.max_num_seqs:
        raise topo.error("serve.max_num_batched_tokens", f"must be at least serve.max_num_seqs "
                         f"({s.max_num_seqs}) so every running sequence can decode each step, "
                         f"got {s.max_num_batched_tokens}")
    seen: dict[str, int] = {}
    addrs: dict[str, int] = {}
    for i, node in enumerate(topo.nodes):
        if node.name in seen:
            raise topo.error(f"nodes[{i}].name", f"duplicate node name {node.name!r} (also nodes[{seen[node.name]}])")
        if node.address in addrs:
            raise topo.error(f"nodes[{i}].address",
                             f"duplicate address {node.address!r} (also nodes[{addrs[node.address]}])")
        seen[node.name] = i
        addrs[node.address] = i
    if topo.device == "cuda" and topo.nodes and not any(n.gpus for n in topo.nodes):
        raise topo.error("device", "is cuda but no node lists gpus")


def _load_yaml(text: str, filename: str) -> tuple[Any, dict[tuple, tuple[int, int]]]:
    """YAML -> (python data, {key path: (key line, value line)}); syntax errors get file:line."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        lines: dict[tuple, tuple[int, int]] = {}
        if node is not None:
            _index_lines(node, (), lines, filename)
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        if e.context_mark is not None and (mark is None or mark.line >= len(text.splitlines())):
            mark = e.context_mark  # a problem found at the end of the file started at the context
        line = mark.line + 1 if mark else 1
        what = ": ".join(x for x in (e.context, e.problem) if x)
        raise TopologyError(f"{filename}:{line}: invalid YAML: {what}") from None
    except yaml.YAMLError as e:
        raise TopologyError(f"{filename}:1: invalid YAML: {e}") from None
    finally:
        loader.dispose()
    return data, lines


def _index_lines(node: yaml.Node, path: tuple, lines: dict, filename: str) -> None:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if k.tag == "tag:yaml.org,2002:merge":
                continue
            key = str(k.value)
            p = path + (key,)
            if p in lines:
                raise TopologyError(f"{filename}:{k.start_mark.line + 1}: {_dotted(p)}: duplicate key "
                                    f"(first at line {lines[p][0]})")
            lines[p] = (k.start_mark.line + 1, v.start_mark.line + 1)
            _index_lines(v, p, lines, filename)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            p = path + (i,)
            lines[p] = (v.start_mark.line + 1, v.start_mark.line + 1)
            _index_lines(v, p, lines, filename)


# ------------------------------------------------------------------------------ error rendering
def _dotted(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _split_key(key: str) -> tuple:
    out: list = []
    for part in key.split("."):
        m = re.match(r"^([^\[]*)((?:\[\d+\])*)$", part)
        name, idx = (m.group(1), m.group(2)) if m else (part, "")
        if name:
            out.append(name)
        out.extend(int(i) for i in re.findall(r"\[(\d+)\]", idx))
    return tuple(out)


def _lookup(lines: dict, path: tuple) -> tuple[int, int] | None:
    return lines.get(tuple(p if isinstance(p, int) else str(p) for p in path))


def _section_at(path: tuple) -> type[BaseModel] | None:
    """The schema class of the mapping at a key path (None when it is not a schema mapping)."""
    cls: type[BaseModel] | None = Topology
    for part in path:
        if cls is None or isinstance(part, int):
            continue
        field = cls.model_fields.get(str(part))
        cls = _model_in(field.annotation) if field else None
    return cls


def _model_in(ann: Any) -> type[BaseModel] | None:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in typing.get_args(ann):
        found = _model_in(arg)
        if found:
            return found
    return None


def _expectation(path: tuple) -> str | None:
    """What the schema field at (or nearest above) a key path expects."""
    # walk back to the nearest schema field (dict values / list items report their field's expectation)
    for cut in range(len(path), 0, -1):
        part = path[cut - 1]
        if isinstance(part, int):
            continue
        cls = _section_at(path[:cut - 1])
        if cls and str(part) in cls.model_fields:
            return (cls.model_fields[str(part)].description or "").split("; ")[0] or None
    return None


def _suggest(loc: tuple) -> list[str]:
    """The valid key nearest to an unknown key at loc (empty when none is close)."""
    parent = _section_at(loc[:-1])
    allowed = list(parent.model_fields) if parent else []
    return difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)


def _render_error(err: dict, lines: dict, filename: str) -> tuple[int, str]:
    """One pydantic error -> (line, 'file:line: key.path: problem')."""
    loc = tuple(err["loc"])
    typ = err["type"]
    if typ == "extra_forbidden":
        hint = _suggest(loc)
        parent = _section_at(loc[:-1])
        msg = (f"unknown key; did you mean {hint[0]!r}?" if hint
               else "unknown key; expected one of: " + ", ".join(parent.model_fields if parent else ()))
        line = (_lookup(lines, loc) or (1, 1))[0]
    elif typ == "missing":
        msg = "missing required key"
        parent = loc[:-1]
        line = (_lookup(lines, parent) or (1, 1))[0] if parent else 1
    elif typ in ("value_error", "assertion_error"):
        msg = str(err.get("ctx", {}).get("error", err["msg"]))
        line = _line_near(lines, loc)
    else:
        is_item = bool(loc) and (isinstance(loc[-1], int) or _section_at(loc[:-1]) is None)
        expect = None if is_item else _expectation(loc)
        got = err.get("input")
        if typ in ("model_type", "model_attributes_type", "dict_type"):
            expect = expect or "a mapping"
        plain = err["msg"].replace("Input should be", "must be")
        msg = f"must be {expect}, got {got!r}" if expect else f"{plain}, got {got!r}"
        line = _line_near(lines, loc)
    return line, f"{filename}:{line}: {_dotted(loc)}: {msg}"


def _line_near(lines: dict, loc: tuple) -> int:
    """Value line of loc, or of its nearest parent present in the file."""
    path = loc
    while path:
        hit = _lookup(lines, path)
        if hit:
            return hit[1]
        path = path[:-1]
    return 1


def schema_reference() -> str:
    """A plain-text list of every topology key with what it expects (for --help)."""
    out: list[str] = []

    def walk(cls: type[BaseModel], prefix: str) -> None:
        for name, field in cls.model_fields.items():
            key = f"{prefix}{name}"
            sub = _model_in(field.annotation)
            default = "" if field.is_required() else _default_text(field)
            if sub is not None:
                list_of = typing.get_origin(field.annotation) is list
                out.append(f"  {key}{'[]' if list_of else ''}:" + (" (optional)" if default else ""))
                walk(sub, f"{key}{'[]' if list_of else ''}.")
            else:
                out.append(f"  {key}: {field.description}" + (f" [default {default}]" if default else " [required]"))

    walk(Topology, "")
    return "\n".join(out)


def _default_text(field: Any) -> str:
    if field.default_factory is not None:
        val = field.default_factory()
        return "empty" if not val else repr(val)
    return "unset" if field.default is None else str(field.default)

"""`orch serve` settings: a topology file (converted on the way) or --shards, flags over YAML."""
import pytest

from orchestrator.cli import build_parser
from orchestrator.commands.serve import server_config
from orchestrator.errors import OrchError
from workers.models.tiny import write_random_checkpoint

TOPOLOGY = """\
name: serve-test
model:
  path: {model}
  dtype: float32
device: cpu
build:
  artifacts: {artifacts}
serve:
  port: 50123
  max_num_seqs: 7
  max_seq_len: 300
  block_size: 32
"""


def _cfg(*argv):
    return server_config(build_parser().parse_args(["serve", *argv]))


def test_topology_file_converts_and_sets_the_defaults(tmp_path):
    model = write_random_checkpoint(tmp_path / "model", seed=5)
    topo = tmp_path / "t.yaml"
    topo.write_text(TOPOLOGY.format(model=model, artifacts=tmp_path / "artifacts"))
    cfg = _cfg(str(topo), "--max-num-seqs", "3", "--num-kv-blocks", "20")
    assert (cfg.shard_dir / "rank-0-0" / "manifest.json").is_file()  # converted
    assert (cfg.model_name, cfg.port, cfg.metrics_port, cfg.device) == ("serve-test", 50123, 51123, "cpu")
    assert (cfg.max_num_seqs, cfg.max_seq_len, cfg.block_size, cfg.num_kv_blocks) == (3, 300, 32, 20)


def test_shards_flags_and_bad_values(tmp_path):
    cfg = _cfg("--shards", str(tmp_path), "--port", "0", "--device", "cpu", "--no-metrics")
    assert (cfg.port, cfg.metrics_port, cfg.model_name) == (0, None, "model")
    assert _cfg("--shards", str(tmp_path), "--port", "65000").metrics_port == 64000
    with pytest.raises(OrchError, match="FILE or --shards"):
        _cfg()
    with pytest.raises(OrchError, match="--max-num-seqs must be a positive integer"):
        _cfg("--shards", str(tmp_path), "--max-num-seqs", "0")
    with pytest.raises(OrchError, match="--kv-cache-fraction"):
        _cfg("--shards", str(tmp_path), "--kv-cache-fraction", "1.5")

"""Write a tiny random-weight checkpoint in Hugging Face layout (no download, no transformers).

Used by the README's first command, `orch smoke` and tests: config.json, model.safetensors and a
byte-level BPE tokenizer.json trained on a small built-in text.
"""
from __future__ import annotations

import json
from pathlib import Path

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A cluster of machines serves a language model.
Tensor parallel ranks share each layer; pipeline stages pass hidden states to the next stage.
Every request streams tokens back as they are generated, one step at a time.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Punctuation: , . ; : ! ? ( ) [ ] { } " ' - _ / \\
Unicode: café, naïve, 東京, München, emoji 🙂 and more text to learn merges from.
"""

SPECIAL_TOKENS = ["<s>", "</s>", "<unk>"]


def write_tokenizer(out_dir: Path, vocab_size: int) -> int:
    """Train a byte-level BPE tokenizer of at most vocab_size tokens; returns its real size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "model_max_length": 4096}, indent=1))
    return tok.get_vocab_size()


def tiny_config(arch: str = "llama", **overrides) -> dict:
    """A config.json dict for a tiny model of the given family (llama | mistral | qwen2)."""
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 512,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "hidden_act": "silu",
        "bos_token_id": 0,
        "eos_token_id": 1,
        "torch_dtype": "float32",
    }
    if arch == "mistral":
        cfg.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=None)
        cfg.pop("attention_bias")
    elif arch == "qwen2":
        cfg.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2")
        cfg.pop("attention_bias")
    elif arch != "llama":
        raise ValueError(f"unknown tiny model family {arch!r} (llama | mistral | qwen2)")
    cfg.update(overrides)
    return cfg


def write_random_checkpoint(out_dir: Path | str, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Write config.json, model.safetensors and tokenizer files for a random tiny model, atomically."""
    import torch
    from safetensors.torch import save_file

    from workers.fsutil import atomic_dir
    from workers.layout import required_sources, source_shape
    from workers.models.config import parse_model_config

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        raw = tiny_config(arch, **overrides)
        real_vocab = write_tokenizer(tmp, raw["vocab_size"])
        assert real_vocab <= raw["vocab_size"], (real_vocab, raw["vocab_size"])
        cfg = parse_model_config(raw)
        gen = torch.Generator().manual_seed(seed)
        tensors = {}
        for name in required_sources(cfg):
            shape = source_shape(cfg, name)
            if name.endswith("norm.weight"):
                t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
            elif name.endswith("bias"):
                t = 0.1 * torch.randn(shape, generator=gen)
            else:
                t = torch.randn(shape, generator=gen) / shape[-1] ** 0.5
            tensors[name] = t.to(torch.float32).contiguous()
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(raw, indent=1))
    return out_dir

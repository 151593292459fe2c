"""Published model shapes (Llama-3.2-1B, Qwen2.5-1.5B, Llama-3.1-8B) as configs, meta-device models and random-weight directories."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field

import torch

LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0}
LLAMA3_ROPE_THETA = 500000.0


@dataclass(frozen=True)
class Shape:
    """One published model's architecture: its config fields and the parameter count its model card states."""

    name: str
    model_type: str
    published_params: int  # what the published checkpoint holds (tied embeddings counted once)
    fields: dict = field(default_factory=dict)


SHAPES = {
    shape.name: shape
    for shape in (
        Shape(
            "llama-3.2-1b",
            "llama",
            1_235_814_400,
            dict(
                hidden_size=2048,
                num_hidden_layers=16,
                num_attention_heads=32,
                num_key_value_heads=8,
                head_dim=64,
                intermediate_size=8192,
                vocab_size=128256,
                tie_word_embeddings=True,
                max_position_embeddings=131072,
                rms_norm_eps=1e-5,
                rope_parameters={
                    **LLAMA3_ROPE,
                    "rope_theta": LLAMA3_ROPE_THETA,
                    "factor": 32.0,
                    "original_max_position_embeddings": 8192,
                },
            ),
        ),
        Shape(
            "qwen2.5-1.5b",
            "qwen2",
            1_543_714_304,
            dict(
                hidden_size=1536,
                num_hidden_layers=28,
                num_attention_heads=12,
                num_key_value_heads=2,
                intermediate_size=8960,
                vocab_size=151936,
                tie_word_embeddings=True,
                max_position_embeddings=32768,
                rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            ),
        ),
        Shape(
            "llama-3.1-8b",
            "llama",
            8_030_261_248,
            dict(
                hidden_size=4096,
                num_hidden_layers=32,
                num_attention_heads=32,
                num_key_value_heads=8,
                head_dim=128,
                intermediate_size=14336,
                vocab_size=128256,
                tie_word_embeddings=False,
                max_position_embeddings=131072,
                rms_norm_eps=1e-5,
                rope_parameters={
                    **LLAMA3_ROPE,
                    "rope_theta": LLAMA3_ROPE_THETA,
                    "factor": 8.0,
                    "original_max_position_embeddings": 8192,
                },
            ),
        ),
        # A small Llama for quick runs of the same pipeline: the real tokenizer's vocabulary, 4 narrow blocks.
        Shape(
            "quick-llama",
            "llama",
            0,
            dict(
                hidden_size=64,
                num_hidden_layers=4,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=128,
                vocab_size=49152,
                tie_word_embeddings=True,
                max_position_embeddings=512,
                rms_norm_eps=1e-5,
                rope_parameters={"rope_type": "default", "rope_theta": LLAMA3_ROPE_THETA},
            ),
        ),
    )
}


def shape_config(shape: Shape, tokenizer=None):
    """The transformers config of `shape`; with a tokenizer, its bos, eos and pad ids (its vocabulary must fit)."""
    from transformers import AutoConfig

    ids = {}
    if tokenizer is not None:
        if len(tokenizer) > shape.fields["vocab_size"]:
            raise ValueError(f"a tokenizer of {len(tokenizer)} tokens does not fit {shape.name}'s vocabulary")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
    return AutoConfig.for_model(shape.model_type, **shape.fields, **ids)


def meta_model(config, dtype: torch.dtype = torch.bfloat16):
    """The causal LM of `config` on the meta device: every shape and dtype, no memory, no weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def param_count(model) -> int:
    """Parameters of a model, tied ones counted once (as a checkpoint stores them)."""
    return sum(p.numel() for p in model.parameters())


def copy_tokenizer(src_dir: str, out_dir: str) -> None:
    """Copies the tokenizer files of `src_dir` (a model directory) into `out_dir`."""
    from tandem.stages.loading import TOKENIZER_FILES

    for name in TOKENIZER_FILES + ("vocab.json", "merges.txt"):
        src = os.path.join(src_dir, name)
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(out_dir, name))


def write_random_model(
    shape: Shape, out_dir: str, tokenizer_dir: str, seed: int = 0, dtype: torch.dtype = torch.bfloat16
) -> str:
    """A Hugging Face directory of `shape` with random weights in `dtype` (safetensors) and the tokenizer of
    `tokenizer_dir`. Reused when it exists with the same config and weights; the weights are written last, so a
    half-written directory is rebuilt."""
    from transformers import AutoModelForCausalLM

    from tandem.stages.loading import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    config = shape_config(shape, tokenizer)
    config.dtype = dtype
    marker = os.path.join(out_dir, "tandem-shape.json")
    want = {"shape": shape.name, "seed": seed, "dtype": str(dtype), "config": config.to_dict()}
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == json.loads(json.dumps(want)):
                return out_dir
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)
    copy_tokenizer(tokenizer_dir, out_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out_dir)
    del model
    with open(marker, "w") as f:
        json.dump(want, f, indent=1)
    return out_dir


def write_config_only(shape: Shape, out_dir: str, tokenizer_dir: str | None = None) -> str:
    """A directory with `shape`'s config.json (and a tokenizer when given) but no weights: enough to plan."""
    from tandem.stages.loading import load_tokenizer

    os.makedirs(out_dir, exist_ok=True)
    tokenizer = None
    if tokenizer_dir is not None:
        tokenizer = load_tokenizer(tokenizer_dir)
        copy_tokenizer(tokenizer_dir, out_dir)
    config = shape_config(shape, tokenizer)
    config.dtype = torch.bfloat16
    config.save_pretrained(out_dir)
    return out_dir

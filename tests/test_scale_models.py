"""Published shapes at random weights (tandem.testing.shapes, bench/scale.py): the configs build the published models'
shapes and parameter counts on the meta device, and a random-weight directory loads with its shape and tokenizer."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from tandem.stages.loading import load_model, load_tokenizer
from tandem.testing.models import make_tokenizer
from tandem.testing.shapes import SHAPES, meta_model, param_count, shape_config, write_config_only, write_random_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the model cards and checkpoints state (tied embeddings counted once).
PUBLISHED = {"llama-3.2-1b": 1.236e9, "qwen2.5-1.5b": 1.544e9, "llama-3.1-8b": 8.03e9}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_shape_builds_the_published_model_on_the_meta_device(name):
    shape = SHAPES[name]
    fields = shape.fields
    model = meta_model(shape_config(shape))
    assert {p.device.type for p in model.parameters()} == {"meta"} and model.dtype == torch.bfloat16
    assert abs(param_count(model) - PUBLISHED[name]) / PUBLISHED[name] <= 0.02, param_count(model)
    assert param_count(model) == shape.published_params

    hidden, heads, kv = fields["hidden_size"], fields["num_attention_heads"], fields["num_key_value_heads"]
    head_dim = hidden // heads
    assert len(model.model.layers) == fields["num_hidden_layers"]
    assert model.model.embed_tokens.weight.shape == (fields["vocab_size"], hidden)
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attention.q_proj.weight.shape == (heads * head_dim, hidden)
    assert attention.k_proj.weight.shape == attention.v_proj.weight.shape == (kv * head_dim, hidden)
    assert (attention.q_proj.bias is not None) == (shape.model_type == "qwen2")  # Qwen2 has q, k, v biases
    assert mlp.gate_proj.weight.shape == mlp.up_proj.weight.shape == (fields["intermediate_size"], hidden)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == fields["tie_word_embeddings"]
    assert model.config.rope_parameters["rope_theta"] == fields["rope_parameters"]["rope_theta"]


def test_llama_3_2_1b_keeps_llama3_rope_scaling():
    config = shape_config(SHAPES["llama-3.2-1b"])
    assert config.rope_parameters["rope_type"] == "llama3" and config.rope_parameters["factor"] == 32.0
    assert config.rope_parameters["rope_theta"] == 500000.0


def test_random_directory_loads_with_its_shape_dtype_and_tokenizer(tmp_path):
    tokenizer_dir = tmp_path / "tok"
    make_tokenizer(str(tokenizer_dir))
    shape = SHAPES["quick-llama"]
    out = write_random_model(shape, str(tmp_path / "model"), str(tokenizer_dir), seed=3)

    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        assert "lm_head.weight" not in f.keys()  # tied: stored once
    assert dtypes == {"BF16"}
    loaded = load_model(out)
    assert param_count(loaded.model) == param_count(meta_model(shape_config(shape)))
    assert loaded.config.hidden_size == 64 and loaded.config.num_hidden_layers == 4
    tokenizer = load_tokenizer(out)
    assert loaded.config.eos_token_id == tokenizer.eos_token_id and loaded.config.bos_token_id == tokenizer.bos_token_id
    assert max(tokenizer("the quick brown fox")["input_ids"]) < loaded.config.vocab_size

    stamp = os.path.getmtime(os.path.join(out, "model.safetensors"))
    assert write_random_model(shape, out, str(tokenizer_dir), seed=3) == out  # the same config and seed: reused
    assert os.path.getmtime(os.path.join(out, "model.safetensors")) == stamp
    write_random_model(shape, out, str(tokenizer_dir), seed=4)  # another seed: other weights
    other = load_model(out).model.state_dict()["model.layers.0.mlp.up_proj.weight"]
    assert not torch.equal(other, loaded.model.state_dict()["model.layers.0.mlp.up_proj.weight"])


def test_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
    make_tokenizer(str(tmp_path / "tok"), vocab_size=300)
    small = SHAPES["quick-llama"]
    small = dataclasses.replace(small, fields={**small.fields, "vocab_size": 100})
    with pytest.raises(ValueError, match="does not fit"):
        shape_config(small, load_tokenizer(str(tmp_path / "tok")))


def test_config_only_directory_holds_no_weights(tmp_path):
    out = write_config_only(SHAPES["llama-3.1-8b"], str(tmp_path / "8b"))
    assert sorted(os.listdir(out)) == ["config.json"]
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["hidden_size"] == 4096


@pytest.mark.slow
def test_scale_quick_runs_end_to_end_and_matches_the_plan(tmp_path):
    """bench/scale.py --quick: the real SmolLM2 tokenizer, `cloud serve` and `client tune` in bfloat16 on loopback TLS,
    and the bytes per step within 10% of `cloud plan`'s."""
    out = tmp_path / "scale.json"
    done = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "bench", "scale.py"),
            "--quick",
            "--work",
            str(tmp_path),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0 and out.exists(), done.stdout[-2000:] + done.stderr[-3000:]
    res = json.loads(out.read_text())
    (run,) = res["runs"]
    assert run["shape"] == "quick-llama" and len(run["step_s"]["all"]) == 2
    for direction in ("up", "down"):
        assert 0.9 <= run["bytes_per_step"][direction]["ratio"] <= 1.1, run["bytes_per_step"]
    assert run["cloud_rss"]["peak_bytes"] > 0 and run["client_rss_peak_bytes"] > 0
    assert res["planned"]["shape"] == "llama-3.1-8b"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the path without CUDA")
def test_gpu_check_without_cuda_shows_the_gpu_tests_skip_and_exits_0():
    done = subprocess.run(
        [os.path.join(ROOT, "scripts", "gpu-check")],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[-1].startswith("gpu-check: no CUDA device here"), lines
    summary = lines[-2]
    assert re.search(r"\b\d+ skipped", summary) and not re.search(r"passed|failed|error", summary), summary
    assert "SKIPPED" in done.stdout  # the reasons are shown

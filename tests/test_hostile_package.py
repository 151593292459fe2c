"""Emulator packages a hostile cloud could build: every value is checked before anything is allocated from it, a
refusal is one line, and a package that passes its checks but diverges stops the run before a step is applied."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tandem.client.assemble import build_offsite
from tandem.client.cli import main as client_main
from tandem.client.errors import ClientError
from tandem.emulator.build import build_emulator
from tandem.emulator.distill import DistillConfig
from tandem.emulator.package import CONFIG_FILE, EMULATOR_FILE, MANIFEST, SINK_FILE, read_manifest
from tandem.stages.adapter_files import sha256
from tandem.stages.lora import LoraConfig


@pytest.fixture(scope="module")
def honest(tiny_models, sample_data, tmp_path_factory):
    """An honest, width-pruned package with a sink (tiny Llama, 2:2, one of two middle blocks kept)."""
    pkg = str(tmp_path_factory.mktemp("hostile_pkg") / "pkg")
    build_emulator(
        tiny_models["llama"], "2:2", pkg, sample_data, DistillConfig(steps=0, seq_len=32), keep=1, mlp_width=16
    )
    return pkg


NESTED = "nested lists deeper than Python's parser recurses"


def forged(honest: str, where: str, edit) -> str:
    """A copy of the honest package with `edit(manifest, dir)` applied and every hash made to match again."""
    shutil.rmtree(where, ignore_errors=True)
    shutil.copytree(honest, where)
    manifest = read_manifest(where)
    edit(manifest, where)
    for name in manifest["files"]:
        with open(os.path.join(where, name), "rb") as f:
            manifest["files"][name]["sha256"] = sha256(f.read())
    text = json.dumps(manifest).replace(json.dumps(NESTED), "[" * 100_000 + "]" * 100_000)  # too deep to dump
    with open(os.path.join(where, MANIFEST), "w") as f:
        f.write(text)
    return where


def config_edit(**values):
    return json_edit(CONFIG_FILE, **values)


def json_edit(name: str, **values):
    def edit(_manifest, where):
        path = os.path.join(where, name)
        with open(path) as f:
            config = json.load(f)
        config.update(values)
        with open(path, "w") as f:
            json.dump(config, f)

    return edit


def tensors_edit(name: str, change):
    def edit(_manifest, where):
        path = os.path.join(where, name)
        state = load_file(path)
        change(state)
        save_file(state, path)

    return edit


def first_tensor(change):
    def apply(state):
        key = sorted(state)[0]
        state[key] = change(state[key])

    return apply


def sink_edit(**tensors):
    """Ships a sink file holding `tensors` (the honest tiny model has no attention sink)."""

    def edit(manifest, where):
        save_file(tensors, os.path.join(where, SINK_FILE))
        manifest["files"][SINK_FILE] = {"sha256": ""}

    return edit


CASES = {
    "MLP width far above the model's": (
        lambda m, d: m["pruning"].update(mlp_width=10**9),
        r"pruning.mlp_width must be 1..64",
    ),
    "MLP width zero": (lambda m, d: m["pruning"].update(mlp_width=0), r"pruning.mlp_width must be 1..64"),
    "pruning not a record": (lambda m, d: m.update(pruning=[1]), "pruning must be a record"),
    "thousands of kept blocks": (
        lambda m, d: (
            m.update(kept_middle_blocks=list(range(2, 3002)), layout={"num_layers": 3004, "bottom": 2, "top": 2}),
            config_edit(num_hidden_layers=3004)(m, d),
        ),
        r"hold 1 block\(s\); the manifest keeps 3000",
    ),
    "a weight of another shape": (
        tensors_edit(EMULATOR_FILE, first_tensor(lambda t: torch.zeros(t.shape[0] + 1, *t.shape[1:]))),
        "do not fit the config",
    ),
    "a NaN weight": (
        tensors_edit(EMULATOR_FILE, first_tensor(lambda t: t.clone().fill_(float("nan")))),
        "NaN or Inf",
    ),
    "an extra tensor": (
        tensors_edit(EMULATOR_FILE, lambda s: s.update(junk=torch.zeros(1))),
        "keys outside the blocks",
    ),
    "a sink of another size": (sink_edit(first_token_output=torch.zeros(7)), "one vector of 32 numbers"),
    "a sink without its vector": (sink_edit(other=torch.zeros(32)), "one vector of 32 numbers"),
    "a NaN sink": (sink_edit(first_token_output=torch.full((32,), float("nan"))), "sink.safetensors holds NaN"),
    "a tokenizer file the manifest does not list": (
        lambda m, d: open(os.path.join(d, "special_tokens_map.json"), "w").write("{}"),
        "special_tokens_map.json, which its manifest does not list",
    ),
    "a tokenizer config that names code": (
        json_edit("tokenizer_config.json", auto_map={"AutoTokenizer": ["x.Tok", None]}),
        "would make transformers run",
    ),
    "no key-value heads": (config_edit(num_key_value_heads=0), "num_key_value_heads is not a positive whole"),
    "negative vocabulary": (config_edit(vocab_size=-1), "vocab_size is not a positive whole"),
    "unknown activation": (config_edit(hidden_act="bogus"), "unknown hidden_act"),
    "padding outside the vocabulary": (config_edit(pad_token_id=10**9), "pad_token_id is not a token"),
    "a head_dim far above the hidden size": (config_edit(head_dim=2**28), "head_dim 268435456: too large"),
    "a deeply nested manifest": (
        lambda m, d: m.update(nested=NESTED),
        "cannot read .*RecursionError",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_hostile_package_is_refused_in_one_line(honest, tmp_path, case):
    edit, error = CASES[case]
    pkg = forged(honest, str(tmp_path / "pkg"), edit)
    with pytest.raises(ClientError, match=error):
        build_offsite(pkg, LoraConfig(rank=4), 0, device="cpu", dtype="float32")


def test_a_package_cannot_choose_the_attention_code(honest, tmp_path):
    """It is dropped; the padding token of early Llama conversions (-1) is still accepted, as transformers does."""
    edit = config_edit(attn_implementation="kernels-community/flash-attn", pad_token_id=-1)
    pkg = forged(honest, str(tmp_path / "pkg"), edit)
    model = build_offsite(pkg, LoraConfig(rank=4), 0, device="cpu", dtype="float32")
    assert model.config._attn_implementation != "kernels-community/flash-attn"


def test_a_diverging_package_stops_the_run_before_a_step(honest, sample_data, tmp_path, capsys):
    """Finite weights whose products overflow: the loss is not finite, so no step is applied and nothing is saved."""
    pkg = forged(
        honest,
        str(tmp_path / "pkg"),
        tensors_edit(EMULATOR_FILE, lambda s: s.update({k: v * 1e30 for k, v in s.items()})),
    )
    out = tmp_path / "run"
    argv = ["tune", "--mode", "offsite", "--emulator", pkg, "--data", sample_data, "--out", str(out), "--steps", "4"]
    rc = client_main([*argv, "--batch-size", "2", "--seq-len", "32", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "not finite, so the step is not applied" in err[0], err
    assert not (out / "report.json").exists() and not (out / "adapter").exists()

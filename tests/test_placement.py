"""LoRA placed on an emulator's slots (offsite `--lora-layers` beyond the client's blocks): the words, the forward
against a hand-merged oracle, slot isolation inside a shared block, refusals, and tune -> push -> eval of a placed
adapter against a real `cloud serve`."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from tandem.client.assemble import build_offsite
from tandem.client.cli import main as client_main
from tandem.client.errors import ClientError
from tandem.client.offsite import eval_plugin, push_adapter
from tandem.client.placement import resolve_placement
from tandem.emulator.model import copy_blocks
from tandem.emulator.package import build_package
from tandem.stages.arch import parts_of
from tandem.stages.loading import load_model
from tandem.stages.lora import LoraConfig
from tandem.stages.lora_layers import split_words
from tandem.stages.modules import StageLayout

KEPT, SLOTS = [2, 3], [0, 0, 1, 1]  # 1:1 of 6 blocks: middle 1-4; block 2 fills slots 0-1, block 3 slots 2-3


def _package(model_dir: str, out: str, shared: bool = True) -> str:
    loaded = load_model(model_dir)
    layout = StageLayout.parse("1:1", loaded.config)
    parts = parts_of(loaded.model)
    maps = dict(slots=SLOTS, slot_blocks=layout.middle_blocks) if shared else {}
    build_package(loaded, layout, KEPT, copy_blocks(parts, KEPT), out, **maps)
    return out


@pytest.fixture(scope="module")
def shared_pkg(tiny_models, tmp_path_factory):
    return _package(tiny_models["llama"], str(tmp_path_factory.mktemp("placed") / "pkg"))


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(5, vocab, (2, 10), generator=torch.Generator().manual_seed(1))


def test_the_words_resolve_against_the_package_and_only_offsite(shared_pkg):
    assert resolve_placement("client,clusters", "offsite", shared_pkg) == (0, 2, 3, 5)
    assert resolve_placement("4,clusters", "offsite", shared_pkg) == (2, 3, 4)
    assert resolve_placement("0,5", "split", None) == (0, 5) and resolve_placement("", "split", None) == ()
    with pytest.raises(ClientError, match="applies to --mode offsite only") as e:
        resolve_placement("client", "split", None)
    assert "\n" not in str(e.value)
    for bad in ("clusters,clusters", "cluster", "1,x", "client,3-1"):
        with pytest.raises(ValueError):
            split_words(bad)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lora_on_one_slot_of_a_shared_block_equals_that_slot_merged_alone(arch, tiny_models, tmp_path):
    """Oracle: the HF model with the kept blocks repeated in their slots, where only the placed slot's copy has the
    LoRA merged into its weights (W + s B A); the block's other slot runs the plain block."""
    pkg = _package(tiny_models[arch], str(tmp_path / "pkg"))
    lora = LoraConfig(rank=2, alpha=4, target_modules=("q_proj", "v_proj"), layers=(0, 1, 5))  # 1 = slot 0 of block 2
    staged = build_offsite(pkg, lora, 0)
    with torch.no_grad():
        for b in staged.adapter.b:
            b.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    ids = _ids(staged.config.vocab_size)
    with torch.no_grad():
        got = staged(ids, torch.ones_like(ids), step=0, seed=0, train=False)

    oracle = load_model(tiny_models[arch]).model.eval()
    parts = parts_of(oracle)
    own = list(parts.blocks)
    repeated = [own[0]] + [own[KEPT[j]] for j in SLOTS] + [own[5]]
    repeated[1] = copy.deepcopy(own[KEPT[0]])  # the placed slot: its own copy, merged below
    scaling = lora.alpha / lora.rank
    prefix = parts.arch.block_prefix
    with torch.no_grad():
        for spec, a, b in zip(staged.adapter.specs, staged.adapter.a, staged.adapter.b):
            block = int(spec.name[len(prefix) + 1 :].split(".")[0])
            layer = repeated[block].get_submodule(spec.name.split(f"{prefix}.{block}.")[1])
            layer.weight += scaling * b @ a
    setattr(getattr(oracle, parts.arch.decoder), parts.arch.blocks, torch.nn.ModuleList(repeated))
    with torch.no_grad():
        want = oracle(input_ids=ids, use_cache=False).logits
    assert torch.allclose(got, want, atol=1e-4), float((got - want).abs().max())

    stage = staged.middle.stage
    clone, shared = stage.slot_blocks()[0], stage.slot_blocks()[1]
    assert clone is not shared and shared is stage.blocks[0]
    assert {p.data_ptr() for p in clone.parameters()} == {p.data_ptr() for p in shared.parameters()}, "weights tied"
    assert not any(p.requires_grad for p in stage.blocks.parameters())


def test_a_placed_slot_trains_and_its_block_stays_frozen(shared_pkg):
    staged = build_offsite(shared_pkg, LoraConfig(rank=2, alpha=4, layers=(0, 3, 4, 5)), 0)
    ids = _ids(staged.config.vocab_size)
    logits = staged(ids, torch.ones_like(ids), step=0, seed=0, train=True)
    logits.float().logsumexp(-1).mean().backward()
    grads = {spec.block: float(a.grad.abs().sum()) for spec, a in zip(staged.adapter.specs, staged.adapter.a)}
    assert set(grads) == {0, 3, 4, 5} and all(g == 0 for g in grads.values()), "B = 0: A gets no gradient yet"
    b_grads = {spec.block: float(b.grad.abs().sum()) for spec, b in zip(staged.adapter.specs, staged.adapter.b)}
    assert b_grads[3] > 0 and b_grads[4] > 0, "both slots of block 3 train their own LoRA"
    assert all(p.grad is None for p in staged.middle.stage.blocks.parameters())


def test_a_dropped_block_or_a_pruned_mlp_is_refused_in_one_line(tiny_models, shared_pkg, tmp_path):
    plain = _package(tiny_models["llama"], str(tmp_path / "plain"), shared=False)  # keeps 2 and 3, drops 1 and 4
    with pytest.raises(ClientError, match=r"blocks 1,4 are not in this emulator.*slots stand for blocks 2-3") as e:
        build_offsite(plain, LoraConfig(rank=2, layers=(0, 1, 2, 4)), 0)
    assert "\n" not in str(e.value)
    assert [s.block for s in build_offsite(plain, LoraConfig(rank=2, layers=(2, 3)), 0).adapter.specs] == [2, 2, 3, 3]

    pruned = str(tmp_path / "pruned")
    loaded = load_model(tiny_models["llama"])
    layout = StageLayout.parse("1:1", loaded.config)
    from tandem.emulator.prune import prune_blocks

    blocks = copy_blocks(parts_of(loaded.model), KEPT)
    record = prune_blocks(blocks, KEPT, {i: torch.arange(64.0) for i in KEPT}, 16)
    build_package(loaded, layout, KEPT, blocks, pruned, pruning=record)
    with pytest.raises(ClientError, match="pruned to 16 neurons") as e:
        build_offsite(pruned, LoraConfig(rank=2, target_modules=("q_proj", "up_proj"), layers=(0, 2, 5)), 0)
    assert "\n" not in str(e.value)
    build_offsite(pruned, LoraConfig(rank=2, target_modules=("q_proj", "v_proj"), layers=(0, 2, 5)), 0)


def test_tune_push_and_eval_a_placed_adapter(tiny_models, shared_pkg, sample_data, server_factory, tmp_path, capsys):
    run = str(tmp_path / "run")
    flags = ["--data", sample_data, "--out", run, "--mode", "offsite", "--emulator", shared_pkg, "--steps", "10"]
    flags += ["--batch-size", "4", "--seq-len", "32", "--lr", "1e-2", "--no-progress", "--lora-layers"]
    assert client_main(["tune", *flags, "client,clusters"]) == 0
    capsys.readouterr()
    adapter = os.path.join(run, "adapter")
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        assert json.load(f)["layers_to_transform"] == [0, 2, 3, 5]
    blocks = {
        int(k.split(".layers.")[1].split(".")[0]) for k in load_file(os.path.join(adapter, "adapter_model.safetensors"))
    }
    assert blocks == {0, 2, 3, 5}

    registry = str(tmp_path / "registry")
    server = server_factory(tiny_models["llama"], "--emulator", shared_pkg, "--adapter-registry", registry)
    pushed = push_adapter(server.transport_cfg(), adapter, "placed")
    assert pushed["blocks"] == [0, 2, 3, 5]
    rep = eval_plugin(server.transport_cfg(), adapter, sample_data, str(tmp_path / "eval"), seq_len=32, name="placed")
    assert rep["validation"]["plugged_in"]["loss"] < rep["validation"]["zero_shot"]["loss"]

    assert client_main(["tune", *flags, "client", "--mode", "split", "--server", "x:1", "--overwrite"]) == 2
    assert "applies to --mode offsite only" in capsys.readouterr().err


def _edited(pkg: str, out: str, **changes) -> str:
    """A copy of `pkg` whose manifest the cloud rewrote (the manifest carries no hash of its own)."""
    import shutil

    shutil.copytree(pkg, out)
    path = os.path.join(out, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    manifest.update(changes)
    with open(path, "w") as f:
        json.dump(manifest, f)
    return out


@pytest.mark.parametrize(
    "changes",
    [
        {"kept_middle_blocks": [3, 2]},  # out of order: block 3's LoRA would train before block 2
        {"kept_middle_blocks": [0, 3]},  # a client block: `clusters` would name it
        {"kept_middle_blocks": [True, 3]},
        {"kept_middle_blocks": [2, 2]},
        {"kept_middle_blocks": [2.0, 3]},
        {"kept_middle_blocks": None},
        {"kept_middle_blocks": "23"},
        {"layout": {"num_layers": "6", "bottom": 1, "top": 1}},
        {"layout": None},
        {"layout": {"num_layers": 10**12, "bottom": 1, "top": 1}},  # no list of a trillion blocks is built
        {"files": []},
        {"slots": [1, 1, 0, 0]},  # block 2's slots run block 3: a kept block must run in its own slot
    ],
)
def test_a_hostile_manifest_is_refused_in_one_line(changes, tiny_models, shared_pkg, tmp_path):
    from tandem.emulator.errors import PackageError
    from tandem.emulator.package import load_package

    base = shared_pkg if "slots" in changes else _package(tiny_models["llama"], str(tmp_path / "plain"), shared=False)
    pkg = _edited(base, str(tmp_path / "hostile"), **changes)
    with pytest.raises(PackageError) as e:
        load_package(pkg)
    assert "\n" not in str(e.value)
    with pytest.raises(ClientError):
        resolve_placement("client,clusters", "offsite", pkg) if "slots" not in changes else build_offsite(
            pkg, LoraConfig(rank=2), 0
        )


def test_resume_refuses_a_package_rebuilt_in_place(tiny_models, sample_data, tmp_path, capsys):
    pkg = _package(tiny_models["llama"], str(tmp_path / "pkg"), shared=False)
    run = str(tmp_path / "run")
    flags = ["--data", sample_data, "--out", run, "--mode", "offsite", "--emulator", pkg, "--batch-size", "2"]
    flags += ["--seq-len", "16", "--no-progress", "--checkpoint-every", "1", "--lora-layers", "client,clusters"]
    assert client_main(["tune", *flags, "--steps", "1"]) == 0
    loaded = load_model(tiny_models["llama"])
    build_package(
        loaded, StageLayout.parse("1:1", loaded.config), [1, 4], copy_blocks(parts_of(loaded.model), [1, 4]), pkg
    )
    capsys.readouterr()
    assert client_main(["tune", *flags, "--steps", "2", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "package SHA-256" in err and len(err.strip().splitlines()) == 1
    assert client_main(["tune", *flags[:6], "--lora-layers", "clusters", "--steps", "1"]) == 2
    assert "--mode offsite needs --emulator" in capsys.readouterr().err

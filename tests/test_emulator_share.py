"""Shared (CRaSh) emulators: CKA clusters, the slot map through the package, shared gradients, hostile maps, and
fetch, offsite tuning, push and plug-in eval of a shared package against a real `cloud serve`."""

from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import replace

import pytest
import torch

import tandem.emulator.distill as dmod
from tandem.client.assemble import build_offsite
from tandem.client.errors import ClientError
from tandem.client.offsite import eval_plugin, fetch_emulator, push_adapter
from tandem.client.trainer import TuneConfig, tune
from tandem.cloud.cli import main as cloud_main
from tandem.emulator.build import build_emulator
from tandem.emulator.distill import DistillConfig
from tandem.emulator.errors import EmulatorError, PackageError, SelectionError
from tandem.emulator.model import EmulatorStage, copy_blocks
from tandem.emulator.package import MANIFEST, build_package, load_package
from tandem.emulator.prune import mlp_width_of
from tandem.emulator.share import cluster_blocks, linear_cka, middle_cka, slot_map
from tandem.stages.adapter_files import sha256
from tandem.stages.arch import parts_of
from tandem.stages.loading import load_model
from tandem.stages.lora import LoraConfig
from tandem.stages.modules import StageLayout, run_blocks
from tandem.testing.models import ARCHS, make_model

DISTILL = dict(batch_size=4, seq_len=32, lr=3e-3, warmup=2, val_every=4, progress=False)
SHARE = dict(structure="share", cka_seqs=16)


@pytest.fixture(scope="module")
def models10(tmp_path_factory):
    """Tiny models with 10 blocks: 2:2 leaves 6 middle blocks to cluster."""
    root = tmp_path_factory.mktemp("models10")
    return {a: make_model(a, str(root / a), layers=10) for a in ARCHS}


@pytest.fixture(scope="module")
def shared_pkg(models10, sample_data, tmp_path_factory):
    """A distilled llama emulator of 3 clusters over the 6 middle blocks."""
    out = str(tmp_path_factory.mktemp("shared") / "pkg")
    build_emulator(models10["llama"], "2:2", out, sample_data, DistillConfig(steps=8, **DISTILL), clusters=3, **SHARE)
    return out


def _ids(vocab: int, shape=(2, 12), seed=0) -> torch.Tensor:
    return torch.randint(5, vocab, shape, generator=torch.Generator().manual_seed(seed))


def test_linear_cka_is_one_for_the_same_representation_up_to_rotation_and_scale():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=g)
    rot, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3.0 * x @ rot + 5.0) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x, torch.randn(200, 16, generator=g)) < 0.2


def test_the_middles_cka_matrix_matches_the_plain_forwards_hidden_states(models10):
    loaded = load_model(models10["llama"])
    layout = StageLayout.parse("2:2", loaded.config)
    ids = _ids(loaded.config.vocab_size, (3, 10))
    got = middle_cka(parts_of(loaded.model), layout, ids, tokens=10_000)  # every token but the first
    with torch.no_grad():
        states = loaded.model(input_ids=ids, output_hidden_states=True).hidden_states  # [i + 1]: block i's output
    outs = [states[i + 1][:, 1:].flatten(0, 1) for i in layout.middle_blocks]
    assert got.shape == (6, 6)
    for a in range(6):
        for b in range(6):
            assert float(got[a, b]) == pytest.approx(linear_cka(outs[a], outs[b]), abs=1e-4), (a, b)


def test_clusters_merge_the_most_similar_neighbours_and_respect_attention_types():
    cka = torch.full((6, 6), 0.2)
    for run in ([0, 1, 2], [3, 4], [5]):
        for a in run:
            for b in run:
                cka[a, b] = 0.95
    assert cluster_blocks(cka, 3) == [[0, 1, 2], [3, 4], [5]]
    assert cluster_blocks(cka, 6) == [[i] for i in range(6)]
    assert cluster_blocks(cka, 1) == [list(range(6))]
    types = ["full"] * 2 + ["sliding"] * 4  # blocks 1 and 2 are alike but never share a block
    assert cluster_blocks(cka, 4, types) == [[0, 1], [2], [3, 4], [5]]
    with pytest.raises(SelectionError, match="at least 2 clusters"):
        cluster_blocks(cka, 1, types)
    with pytest.raises(SelectionError, match="choose --clusters 1..6"):
        cluster_blocks(cka, 7)
    middle = [2, 3, 4, 5, 6, 7]
    assert slot_map(middle, [[0, 1, 2], [3, 4], [5]]) == ([3, 5, 7], [0, 0, 0, 1, 1, 2], middle)
    assert slot_map(middle, [[0, 1, 2], [3, 4], [5]], [2, 6, 7])[0] == [2, 6, 7]  # the caller's choice
    with pytest.raises(SelectionError, match="inside each cluster"):
        slot_map(middle, [[0, 1, 2], [3, 4], [5]], [2, 3, 7])


@pytest.mark.parametrize("arch", ARCHS)
def test_a_shared_emulator_equals_the_model_with_its_kept_blocks_repeated(arch, models10, tmp_path):
    """Oracle: the plain Hugging Face forward over a block list that repeats the kept blocks in their slots."""
    loaded = load_model(models10[arch])
    layout = StageLayout.parse("2:2", loaded.config)
    kept, slots, slot_blocks = [3, 4, 7], [0, 0, 1, 1, 1, 2], layout.middle_blocks
    parts = parts_of(loaded.model)
    build_package(
        loaded, layout, kept, copy_blocks(parts, kept), str(tmp_path / "pkg"), slots=slots, slot_blocks=slot_blocks
    )
    staged = build_offsite(str(tmp_path / "pkg"), LoraConfig(rank=4, alpha=8), 0)  # LoRA B = 0: no change yet
    ids = _ids(loaded.config.vocab_size)
    with torch.no_grad():
        got = staged(ids, torch.ones_like(ids), step=0, seed=0, train=False)
    oracle = load_model(models10[arch]).model.eval()
    dec = getattr(oracle, parts.arch.decoder)
    own = getattr(dec, parts.arch.blocks)
    repeated = (
        [own[i] for i in layout.bottom_blocks] + [own[kept[j]] for j in slots] + [own[i] for i in layout.top_blocks]
    )
    setattr(dec, parts.arch.blocks, torch.nn.ModuleList(repeated))  # the same module object in each of its slots
    with torch.no_grad():
        want = oracle(input_ids=ids, use_cache=False).logits
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
    # And not the unshared emulator: the repeats matter.
    stage = staged.middle.stage
    assert isinstance(stage, EmulatorStage) and stage.slots == slots and len(stage.blocks) == 3
    h = torch.randn(2, 12, loaded.config.hidden_size)
    am = torch.ones(2, 12, dtype=torch.long)
    with torch.no_grad():
        assert not torch.allclose(stage(h, am), run_blocks(stage.parts, stage.blocks, h, am))


def test_the_slot_map_round_trips_and_weights_are_stored_once(models10, shared_pkg):
    pkg = load_package(shared_pkg)
    man = pkg.manifest
    sel = man["selection"]
    assert sel["method"] == "share" and len(sel["clusters"]) == 3
    assert [b for run in sel["clusters"] for b in run] == [2, 3, 4, 5, 6, 7]
    assert man["kept_middle_blocks"] == sel["representatives"] == [run[(len(run) - 1) // 2] for run in sel["clusters"]]
    assert pkg.slots == man["slots"] == [c for c, run in enumerate(sel["clusters"]) for _ in run]
    assert pkg.slot_blocks == man["slot_blocks"] == [2, 3, 4, 5, 6, 7]
    assert len(sel["cka_adjacent"]) == 5 and len(sel["cka"]) == 6
    assert all(sel["cka"][j][j + 1] == sel["cka_adjacent"][j] for j in range(5))
    assert set(man["dropped_middle_blocks"]) == {2, 3, 4, 5, 6, 7} - set(man["kept_middle_blocks"])
    d = man["distillation"]
    assert d["val_kd_after"] < d["val_kd_before"], d["val"]
    # Each unique block's tensors once, whatever the number of its slots.
    blocks = pkg.emulator_blocks()
    assert len(blocks) == 3 and man["params"]["emulator"] == sum(p.numel() for p in blocks.parameters())
    from safetensors.torch import load_file

    keys = load_file(pkg.file("emulator.safetensors"))
    assert {int(k.split(".")[2]) for k in keys} == {0, 1, 2}
    # The loaded stage runs each block in its slots (the distilled weights, not the model's).
    config = pkg.config()
    parts = parts_of(load_model(models10["llama"]).model)
    stage = pkg.emulator_stage(parts, config)
    h, am = torch.randn(2, 12, config.hidden_size), torch.ones(2, 12, dtype=torch.long)
    with torch.no_grad():
        want = run_blocks(parts, [blocks[i] for i in pkg.slots], h, am)
        assert torch.equal(stage(h, am), want)


def test_a_shared_blocks_gradient_is_the_sum_over_its_slots(models10):
    loaded = load_model(models10["gpt2"])
    parts = parts_of(loaded.model)
    layout = StageLayout.parse("2:2", loaded.config)
    kept, slots, slot_blocks = [3, 6], [0, 0, 0, 1, 1, 1], layout.middle_blocks
    cfg = DistillConfig(steps=0, batch_size=2, layer_weight=0.5, kd_norm="token")
    shared = dmod.Distiller(parts, layout, kept, copy_blocks(parts, kept), slots, slot_blocks)
    mods = shared.slot_modules()
    assert mods[0] is mods[1] is mods[2] and mods[3] is mods[5] and mods[0] is not mods[3]  # no copies
    # Independent copies, one per slot, as an unshared student standing for the same middle blocks.
    copies = torch.nn.ModuleList(copy.deepcopy(shared.student[i]) for i in slots)
    apart = dmod.Distiller(parts, layout, slot_blocks, copies)
    ids = _ids(loaded.config.vocab_size, (2, 16))
    teacher = shared.teacher(ids, cfg)
    losses = []
    for d in (shared, apart):
        d.student.requires_grad_(True)
        out = d.losses(ids, cfg, teacher)
        out["loss"].backward()
        losses.append(float(out["loss"].detach()))
    assert losses[0] == pytest.approx(losses[1]) and losses[0] > 0
    for u, block in enumerate(shared.student):
        for name, p in block.named_parameters():
            total = sum(dict(copies[j].named_parameters())[name].grad for j, i in enumerate(slots) if i == u)
            assert p.grad is not None and torch.allclose(p.grad, total, rtol=1e-4, atol=1e-6), name
            assert float(p.grad.abs().sum()) > 0


def _rewrite(src: str, dst: str, edit) -> str:
    """A copy of package src whose manifest (and, with edit's help, files) is altered; hashes kept consistent."""
    shutil.copytree(src, dst)
    with open(os.path.join(dst, MANIFEST)) as f:
        man = json.load(f)
    edit(man, dst)
    for name in man["files"]:
        with open(os.path.join(dst, name), "rb") as f:
            man["files"][name]["sha256"] = sha256(f.read())
    with open(os.path.join(dst, MANIFEST), "w") as f:
        json.dump(man, f)
    return dst


HOSTILE = [
    ("out of range", lambda m, d: m.update(slots=[0, 0, 1, 1, 2, 7]), r"names blocks \[7\] but the emulator has 3"),
    ("negative", lambda m, d: m.update(slots=[0, 0, 1, 1, 2, -1]), r"names blocks \[-1\]"),
    ("short", lambda m, d: m.update(slots=[0, 1, 2]), "one middle block per slot"),
    ("unused", lambda m, d: m.update(slots=[0, 0, 0, 1, 1, 1]), r"never uses blocks \[2\]"),
    ("not ints", lambda m, d: m.update(slots=["0", 1, 2, 2, 2, 2]), "list of block indices"),
    ("bools", lambda m, d: m.update(slots=[True, False, 2, 2, 2, 2]), "list of block indices"),
    ("not a list", lambda m, d: m.update(slots={"a": 1}), "list of block indices"),
    ("no slot_blocks", lambda m, d: m.pop("slot_blocks"), "one middle block per slot"),
    ("only slot_blocks", lambda m, d: m.pop("slots"), "list of block indices"),
    ("outside the middle", lambda m, d: m.update(slot_blocks=[2, 3, 4, 5, 6, 8]), "increasing middle blocks"),
    ("unordered", lambda m, d: m.update(slot_blocks=[3, 2, 4, 5, 6, 7]), "increasing middle blocks"),
    ("kept unordered", lambda m, d: m.update(kept_middle_blocks=m["kept_middle_blocks"][::-1]), "increasing middle"),
]


@pytest.mark.parametrize("case,edit,message", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_a_hostile_slot_map_is_refused_in_one_line(case, edit, message, shared_pkg, tmp_path):
    bad = _rewrite(shared_pkg, str(tmp_path / "bad"), edit)
    with pytest.raises(PackageError, match=message) as e:
        load_package(bad)
    assert "\n" not in str(e.value)
    with pytest.raises(ClientError, match="--emulator: .*" + message):
        build_offsite(bad, LoraConfig(rank=4), 0)


def test_a_slot_running_a_block_of_another_attention_type_is_refused(models10, sample_data, tmp_path):
    src = str(tmp_path / "qwen")
    build_emulator(models10["qwen2"], "2:2", src, sample_data, DistillConfig(steps=0, **DISTILL), clusters=2, **SHARE)
    assert load_package(src).slots is not None  # all full attention: loads

    def alternate(man, d):
        with open(os.path.join(d, "config.json")) as f:
            cfg = json.load(f)
        cfg["layer_types"] = ["full_attention", "sliding_attention"] * 5
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(cfg, f)

    with pytest.raises(PackageError, match="run a block of another attention type"):
        load_package(_rewrite(src, str(tmp_path / "bad"), alternate))

    def short(man, d):
        with open(os.path.join(d, "config.json")) as f:
            cfg = json.load(f)
        cfg["layer_types"] = ["full_attention"] * 3
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(cfg, f)

    with pytest.raises(PackageError, match="config.json: a model configuration that does not load") as e:
        load_package(_rewrite(src, str(tmp_path / "short"), short))
    assert "\n" not in str(e.value)


def test_a_hostile_server_cannot_slip_a_bad_slot_map_into_a_fetch(
    models10, shared_pkg, server_factory, tmp_path, monkeypatch
):
    """The cloud itself is hostile: it holds the sealing key, so it signs its bad manifest; the client's own
    check of the slot map refuses it."""
    import tandem.client.offsite as offsite_mod
    from tandem.testing.proxies import HostileProxy, chunk, signed_by_the_cloud, whole_files

    server = server_factory(models10["llama"], "--emulator", shared_pkg)
    nonce = b"n" * 32
    monkeypatch.setattr(offsite_mod, "fresh_nonce", lambda: nonce)

    def bad_slots(chunks):
        files = whole_files(chunks)
        man = json.loads(files[MANIFEST])
        man["slots"] = [0, 0, 1, 1, 2, 9]
        files[MANIFEST] = json.dumps(man).encode()
        return signed_by_the_cloud(server.tls_dir, nonce, [chunk(n, b) for n, b in files.items()])

    proxy = HostileProxy(server, rewrite=bad_slots)
    try:
        with pytest.raises(ClientError, match=r"does not verify: .*names blocks \[9\]"):
            fetch_emulator(replace(server.transport_cfg(), server=proxy.addr), str(tmp_path / "fetched"))
    finally:
        proxy.close()
    assert not os.path.exists(tmp_path / "fetched")


def test_fetch_tune_push_and_eval_with_a_shared_package(models10, shared_pkg, sample_data, server_factory, tmp_path):
    registry = str(tmp_path / "registry")
    server = server_factory(models10["llama"], "--emulator", shared_pkg, "--adapter-registry", registry)
    transport_cfg = server.transport_cfg()
    fetched = str(tmp_path / "fetched")
    got = fetch_emulator(transport_cfg, fetched)
    assert load_package(fetched).manifest == load_package(shared_pkg).manifest
    assert got["kept_middle_blocks"] == load_package(shared_pkg).kept

    calls = []
    real = EmulatorStage.forward

    def counting(self, h, attention_mask):
        hooks = [b.register_forward_hook(lambda *a: calls.append(1)) for b in self.blocks]
        try:
            return real(self, h, attention_mask)
        finally:
            for hook in hooks:
                hook.remove()

    run = str(tmp_path / "run")
    cfg = TuneConfig(
        data=sample_data,
        out=run,
        mode="offsite",
        emulator=fetched,
        steps=12,
        batch_size=4,
        seq_len=32,
        lr=1e-2,
        lora=LoraConfig(rank=4, alpha=8),
        progress=False,
    )
    EmulatorStage.forward = counting
    try:
        r = tune(cfg)
    finally:
        EmulatorStage.forward = real
    assert r["mode"] == "offsite" and r["totals"]["bytes_sent"] == 0
    assert r["validation"]["after"]["loss"] < r["validation"]["before"]["loss"]
    assert calls and len(calls) % 6 == 0, "every emulator pass runs all six slots"
    adapter = os.path.join(run, "adapter")
    pushed = push_adapter(transport_cfg, adapter, "shared")
    assert pushed["blocks"] == [0, 1, 8, 9] and not pushed["already_registered"]
    rep = eval_plugin(
        transport_cfg, adapter, sample_data, str(tmp_path / "eval"), seq_len=32, batch_size=4, name="shared"
    )
    v = rep["validation"]
    assert v["plugged_in"]["loss"] < v["zero_shot"]["loss"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_width_pruning_composes_with_sharing(arch, models10, sample_data, tmp_path):
    out = str(tmp_path / "pkg")
    cfg = DistillConfig(steps=2, **DISTILL)
    m = build_emulator(models10[arch], "2:2", out, sample_data, cfg, keep=2, mlp_width=16, **SHARE)
    pkg = load_package(out)
    assert len(pkg.kept) == 2 and len(pkg.slots) == 6 and m["pruning"]["mlp_width"] == 16
    assert all(mlp_width_of(b) == 16 for b in pkg.emulator_blocks())
    full = build_emulator(models10[arch], "2:2", str(tmp_path / "full"), sample_data, cfg, keep=2, **SHARE)
    assert m["params"]["emulator"] < full["params"]["emulator"]
    assert full["kept_middle_blocks"] == m["kept_middle_blocks"]  # the same clusters: pruning acts on unique blocks
    staged = build_offsite(out, LoraConfig(rank=4), 0)
    ids = _ids(pkg.config().vocab_size)
    with torch.no_grad():
        assert torch.isfinite(staged(ids, torch.ones_like(ids), step=0, seed=0, train=False)).all()


def test_the_build_refuses_what_sharing_cannot_do(models10, sample_data, tmp_path):
    out, cfg = str(tmp_path / "pkg"), DistillConfig(steps=0, **DISTILL)
    path = models10["llama"]
    with pytest.raises(SelectionError, match="give --distill-data"):
        build_emulator(path, "2:2", out, None, cfg, clusters=2, **SHARE)
    with pytest.raises(SelectionError, match="exactly one of --clusters C, --keep N or --drop-ratio F"):
        build_emulator(path, "2:2", out, sample_data, cfg, **SHARE)
    with pytest.raises(SelectionError, match="exactly one of --clusters C"):
        build_emulator(path, "2:2", out, sample_data, cfg, clusters=2, keep=2, **SHARE)
    with pytest.raises(SelectionError, match="picks its blocks by clustering"):
        build_emulator(path, "2:2", out, sample_data, cfg, keep_blocks=[2, 7], **SHARE)
    with pytest.raises(SelectionError, match="drops blocks"):
        build_emulator(path, "2:2", out, sample_data, cfg, keep=2, select="greedy", **SHARE)
    with pytest.raises(SelectionError, match="with --structure share"):
        build_emulator(path, "2:2", out, sample_data, cfg, clusters=2)
    with pytest.raises(SelectionError, match="choose --clusters 1..6"):
        build_emulator(path, "2:2", out, sample_data, cfg, clusters=9, **SHARE)
    with pytest.raises(SelectionError, match="--keep-sink-block adjusts the uniform drop"):
        build_emulator(path, "2:2", out, sample_data, cfg, clusters=2, keep_sink=True, **SHARE)
    with pytest.raises(SelectionError, match="--budget bounds"):  # flags are checked before the model loads
        build_emulator(str(tmp_path / "no-such-model"), "2:2", out, sample_data, cfg, clusters=2, budget=0.5, **SHARE)
    with pytest.raises(EmulatorError, match="--init rescale"):
        build_emulator(
            path, "2:2", out, sample_data, DistillConfig(steps=1, init="rescale", **DISTILL), keep=2, **SHARE
        )


def test_cloud_emulator_build_share_from_the_command_line(models10, sample_data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cloud_main(["emulator", "build", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in ("--structure {drop,share}", "--clusters C", "--cka-seqs", "linear CKA", "every slot"):
        assert words in text, words
    out = str(tmp_path / "pkg")
    argv = ["emulator", "build", "--model", models10["gpt2"], "--distill-data", sample_data, "--out", out]
    argv += ["--structure", "share", "--keep", "3", "--cka-seqs", "8", "--steps", "0", "--seq-len", "32"]
    assert cloud_main(argv + ["--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["selection"] == "share" and summary["slots"] == 6 and len(summary["kept_middle_blocks"]) == 3
    plain = argv[:8] + ["--clusters", "2", "--steps", "0", "--seq-len", "32", "--no-progress"]
    assert cloud_main(plain) == 2  # --clusters groups a shared emulator's blocks
    assert "with --structure share" in capsys.readouterr().err


# Levers that make sharing pay: a cap on a cluster's size, and per-slot update scales.


def test_a_cluster_cap_is_honoured_and_an_unreachable_count_refused():
    cka = torch.full((6, 6), 0.99)  # all alike: uncapped, the greedy merge makes one long run
    assert max(len(run) for run in cluster_blocks(cka, 2)) >= 3
    for cap, clusters in ((2, 3), (3, 2), (4, 2), (2, 4), (1, 6)):
        runs = cluster_blocks(cka, clusters, max_cluster=cap)
        assert len(runs) == clusters and [p for run in runs for p in run] == list(range(6))
        assert max(len(run) for run in runs) <= cap, (cap, runs)
    # The best pair sits in the middle: merging it first would strand the ends; the cap still reaches 2 of 2.
    middle = torch.full((4, 4), 0.1)
    middle[1, 2] = middle[2, 1] = 0.99
    assert cluster_blocks(middle, 2, max_cluster=2) == [[0, 1], [2, 3]]
    assert cluster_blocks(middle, 3, max_cluster=2) == [[0], [1, 2], [3]]
    with pytest.raises(SelectionError, match=r"into 2 clusters of at most 2 blocks \(at least 3 are needed\)") as e:
        cluster_blocks(cka, 2, max_cluster=2)
    assert "\n" not in str(e.value)
    with pytest.raises(SelectionError, match="--max-cluster must be >= 1"):
        cluster_blocks(cka, 6, max_cluster=0)
    types = ["full"] * 2 + ["sliding"] * 4  # types and cap together: [0, 1] | [2..5] needs 3 clusters at cap 2
    assert cluster_blocks(cka, 3, types, max_cluster=2) == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(SelectionError, match="at least 3 are needed"):
        cluster_blocks(cka, 2, types, max_cluster=3)


def _tiny_stage(models10, arch="llama", scales=None):
    loaded = load_model(models10[arch])
    parts = parts_of(loaded.model)
    blocks = torch.nn.ModuleList(parts.blocks[i] for i in (3, 6))
    return loaded, parts, EmulatorStage(parts, blocks, slots=[0, 0, 0, 1, 1, 1], scales=scales)


def test_slot_scales_of_one_give_exactly_the_unscaled_forward_and_others_scale_each_update(models10):
    loaded, parts, plain = _tiny_stage(models10)
    h = torch.randn(2, 12, loaded.config.hidden_size, generator=torch.Generator().manual_seed(1))
    am = torch.ones(2, 12, dtype=torch.long)
    ones = EmulatorStage(parts, plain.blocks, slots=plain.slots, scales=[1.0] * 6)
    scales = [0.5, 1.0, -0.25, 2.0, 1.5, 0.75]
    scaled = EmulatorStage(parts, plain.blocks, slots=plain.slots, scales=scales)
    with torch.no_grad():
        assert torch.equal(ones(h, am), plain(h, am))
        want = h
        for block, a in zip(plain.slot_blocks(), scales):
            want = want + a * (run_blocks(parts, [block], want, am) - want)
        got = scaled(h, am)
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, plain(h, am), atol=1e-3)
    with pytest.raises(PackageError, match="slot scales need a slot map"):
        EmulatorStage(parts, plain.blocks, slots=plain.slots, scales=[1.0] * 5)


def test_a_fitted_slot_scale_is_the_least_squares_closed_form(models10):
    from tandem.emulator.share import fit_slot_scales

    loaded, parts, stage = _tiny_stage(models10)
    layout = StageLayout.parse("2:2", loaded.config)
    ids = _ids(loaded.config.vocab_size, (3, 10), seed=4)
    slot_blocks = layout.middle_blocks
    got = fit_slot_scales(parts, layout, list(stage.blocks), stage.slots, slot_blocks, ids, batch_size=2)
    assert len(got) == 6 and len(set(got)) == 6
    am = torch.ones_like(ids)
    with torch.no_grad():  # independently: the plain forward's hidden states are the targets
        states = loaded.model(input_ids=ids, output_hidden_states=True).hidden_states  # [i + 1]: block i's output
        h = states[layout.bottom_blocks[-1] + 1]
        for s, (block, b) in enumerate(zip(stage.slot_blocks(), slot_blocks)):
            u = run_blocks(parts, [block], h, am) - h
            target = states[b + 1]
            alpha = float((u[:, 1:] * (target - h)[:, 1:]).sum() / u[:, 1:].pow(2).sum())
            assert got[s] == pytest.approx(alpha, rel=1e-4, abs=1e-6), s
            h = h + alpha * u


def _scaled_pkg(models10, tmp_path, scales=(0.5, 0.75, 1.0, 1.25, 1.5, 2.0)) -> str:
    loaded = load_model(models10["llama"])
    layout = StageLayout.parse("2:2", loaded.config)
    out = str(tmp_path / "scaled")
    blocks = copy_blocks(parts_of(loaded.model), [3, 6])
    slots = [0, 0, 0, 1, 1, 1]
    build_package(
        loaded, layout, [3, 6], blocks, out, slots=slots, slot_blocks=layout.middle_blocks, slot_scales=list(scales)
    )
    return out


SCALES_HOSTILE = [
    ("nan", lambda m, d: m.update(slot_scales=[float("nan")] + m["slot_scales"][1:])),
    ("inf", lambda m, d: m.update(slot_scales=[float("inf")] + m["slot_scales"][1:])),
    ("too large", lambda m, d: m.update(slot_scales=[8.5] + m["slot_scales"][1:])),
    ("huge int", lambda m, d: m.update(slot_scales=[10**400] + m["slot_scales"][1:])),
    ("short", lambda m, d: m.update(slot_scales=m["slot_scales"][:5])),
    ("long", lambda m, d: m.update(slot_scales=m["slot_scales"] + [1.0])),
    ("strings", lambda m, d: m.update(slot_scales=["1.0"] * 6)),
    ("bools", lambda m, d: m.update(slot_scales=[True] * 6)),
    ("not a list", lambda m, d: m.update(slot_scales={"0": 1.0})),
    ("null", lambda m, d: m.update(slot_scales=None)),
]


def test_slot_scales_round_trip_and_hostile_ones_are_refused_in_one_line(models10, tmp_path):
    pkg_dir = _scaled_pkg(models10, tmp_path)
    pkg = load_package(pkg_dir)
    assert pkg.manifest["slot_scales"] == pkg.slot_scales == [0.5, 0.75, 1.0, 1.25, 1.5, 2.0]
    parts = parts_of(load_model(models10["llama"]).model)
    stage = pkg.emulator_stage(parts)
    assert stage.scales == pkg.slot_scales and stage.slots == [0, 0, 0, 1, 1, 1]
    staged = build_offsite(pkg_dir, LoraConfig(rank=4), 0)
    assert staged.middle.stage.scales == pkg.slot_scales
    cases = SCALES_HOSTILE + [("no slot map", lambda m, d: [m.pop("slots"), m.pop("slot_blocks")])]
    for case, edit in cases:
        bad = _rewrite(pkg_dir, str(tmp_path / case.replace(" ", "_")), edit)
        message = "no slot map" if case == "no slot map" else r"slot_scales must list 6 finite numbers in \[-8, 8\]"
        with pytest.raises(PackageError, match=message) as e:
            load_package(bad)
        assert "\n" not in str(e.value), case
    with pytest.raises(PackageError, match="no slot map"):  # the builder refuses the same
        build_package(
            load_model(models10["llama"]),
            StageLayout(10, 2, 2),
            [3],
            copy_blocks(parts, [3]),
            str(tmp_path / "x"),
            slot_scales=[1.0],
        )


def test_distillation_runs_the_slots_with_their_fixed_scales(models10):
    loaded, parts, _ = _tiny_stage(models10, "gpt2")
    layout = StageLayout.parse("2:2", loaded.config)
    scales = [0.5, 1.0, 1.5, 0.8, 1.2, 2.0]
    student = copy_blocks(parts, [3, 6])
    d = dmod.Distiller(parts, layout, [3, 6], student, [0, 0, 0, 1, 1, 1], layout.middle_blocks, scales)
    stage = EmulatorStage(parts, student, slots=[0, 0, 0, 1, 1, 1], scales=scales)
    h = torch.randn(2, 12, loaded.config.hidden_size, generator=torch.Generator().manual_seed(2))
    am = torch.ones(2, 12, dtype=torch.long)
    with torch.no_grad():
        want = stage(h, am)
        assert torch.equal(d.student_states(h, am, False)[-1], want)
        assert torch.allclose(d.student_states(h, am, True)[-1], want, atol=1e-6)
    student.requires_grad_(True)
    cfg = DistillConfig(steps=0, batch_size=2, layer_weight=0.5)
    d.losses(_ids(loaded.config.vocab_size, (2, 12)), cfg)["loss"].backward()
    assert all(p.grad is not None for p in student.parameters()) and d.scales == scales  # scales are not parameters
    with pytest.raises(SelectionError, match="give --structure share"):
        build_emulator(models10["gpt2"], "2:2", "unused", None, cfg, keep=2, slot_scales="fit")
    with pytest.raises(SelectionError, match="--max-cluster caps"):
        build_emulator(models10["gpt2"], "2:2", "unused", None, cfg, keep=2, max_cluster=2)


def test_learned_slot_scales_get_each_slots_gradient_and_train_with_the_blocks(models10):
    loaded, parts, _ = _tiny_stage(models10, "llama")
    layout = StageLayout.parse("2:2", loaded.config)
    start = [0.5, 1.0, 1.5, 0.8, 1.2, 2.0]
    student, slots = copy_blocks(parts, [3, 6]), [0, 0, 0, 1, 1, 1]
    learned = dmod.learnable(start)
    fixed = dmod.Distiller(parts, layout, [3, 6], student, slots, layout.middle_blocks, start)
    d = dmod.Distiller(parts, layout, [3, 6], student, slots, layout.middle_blocks, learned)
    h = torch.randn(2, 12, loaded.config.hidden_size, generator=torch.Generator().manual_seed(2))
    am = torch.ones(2, 12, dtype=torch.long)
    # The same forward as the fixed scales (a slot of scale 1.0 is wrapped too, so it gets a gradient).
    assert torch.allclose(d.student_states(h, am, False)[-1], fixed.student_states(h, am, False)[-1], atol=1e-5)
    student.requires_grad_(True)
    cfg = DistillConfig(steps=1, batch_size=2, layer_weight=0.5)
    d.losses(_ids(loaded.config.vocab_size, (2, 12)), cfg)["loss"].backward()
    assert learned.grad is not None and bool((learned.grad != 0).all()) and bool(learned.grad.isfinite().all())
    opt = dmod.build_optimizer(student, learned, cfg)
    assert [g["lr"] for g in opt.param_groups] == [cfg.lr, cfg.lr * dmod.SCALE_LR_FACTOR]
    assert len(dmod.build_optimizer(student, start, cfg).param_groups) == 1  # fixed scales are not trained


def test_learned_slot_scales_resume_to_the_uninterrupted_result(models10, sample_data, tmp_path, monkeypatch):
    from dataclasses import replace

    from tandem.emulator.text import read_texts

    loaded, layout = load_model(models10["gpt2"]), StageLayout(10, 2, 2)
    cfg = DistillConfig(**{**DISTILL, "steps": 4, "checkpoint_every": 2, "batch_size": 2})
    start, slots = [0.5, 1.0, 1.5, 0.8, 1.2, 2.0], [0, 0, 0, 1, 1, 1]
    texts = read_texts(sample_data)

    def run(out, resume=False):
        student = copy_blocks(parts_of(loaded.model), [3, 6])
        c = replace(cfg, resume=resume)
        return dmod.distill(loaded, layout, [3, 6], texts, c, out, student, slots, layout.middle_blocks, start, True)

    _, full = run(str(tmp_path / "full"))
    real = dmod.save_checkpoint

    def save_then_stop(path, payload):  # an interruption right after the first checkpoint (step 2)
        real(path, payload)
        raise KeyboardInterrupt

    monkeypatch.setattr(dmod, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run(str(tmp_path / "cut"))
    monkeypatch.setattr(dmod, "save_checkpoint", real)
    _, resumed = run(str(tmp_path / "cut"), resume=True)
    assert resumed["slot_scales"] == full["slot_scales"] != start
    fixed = (loaded, layout, [3, 6], texts, replace(cfg, resume=True), str(tmp_path / "cut"))
    with pytest.raises(EmulatorError, match=r"other settings \(slot_scales_learn\)"):  # fixed does not resume learned
        dmod.distill(*fixed, copy_blocks(parts_of(loaded.model), [3, 6]), slots, layout.middle_blocks, start)
    # The finished run's checkpoint, edited: settings that match, contents that do not fit.
    ckpt = tmp_path / "cut" / dmod.CHECKPOINT
    done = torch.load(ckpt, weights_only=True)
    edits = {"slot_scales": torch.tensor([7.5]), "step": 99, "history": [1]}
    edits |= {"settings": {**done["settings"], "seed": torch.tensor([0, 0])}}
    for key, value in [*edits.items(), ("slot_scales", torch.full((6,), float("nan"))), ("step", -3)]:
        torch.save({**done, key: value}, ckpt)
        with pytest.raises(EmulatorError, match="start fresh without --resume") as e:
            run(str(tmp_path / "cut"), resume=True)
        assert "\n" not in str(e.value) and ("other settings (seed)" in str(e.value)) == (key == "settings"), key


def test_cloud_emulator_build_cap_and_scales_from_the_command_line(models10, sample_data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cloud_main(["emulator", "build", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in ("--max-cluster K", "--slot-scales {none,fit,learn}", "h + a * (block(h) - h)", "trains them"):
        assert words in text, words
    out = str(tmp_path / "pkg")
    argv = ["emulator", "build", "--model", models10["gpt2"], "--distill-data", sample_data, "--out", out]
    argv += ["--structure", "share", "--cka-seqs", "8", "--seq-len", "32", "--batch-size", "2", "--no-progress"]
    argv += ["--val-fraction", "0.05"]  # a short validation: the distilled build's cost
    levers = ["--clusters", "3", "--max-cluster", "2", "--slot-scales", "fit"]
    assert cloud_main(argv + ["--steps", "0"] + levers) == 0
    capsys.readouterr()
    man = load_package(out).manifest
    assert man["selection"]["max_cluster"] == 2 and [len(run) for run in man["selection"]["clusters"]] == [2, 2, 2]
    assert man["selection"]["slot_scales"] == {"method": "fit", "sequences": 8}
    assert len(man["slot_scales"]) == 6 and all(abs(a) <= 8 for a in man["slot_scales"])
    assert len(set(man["slot_scales"])) == 6 and man["slot_scales"] != [1.0] * 6
    # Distillation trains the blocks with the scales fitted before it, and keeps them.
    assert cloud_main(argv + ["--steps", "2"] + levers) == 0
    capsys.readouterr()
    distilled = load_package(out).manifest
    assert distilled["slot_scales"] == man["slot_scales"] and distilled["distillation"]["train_kd_first"] > 0
    # 'learn' starts from the same fit and trains the scales: they move, stay in range, and the package loads.
    assert cloud_main(argv + ["--steps", "2"] + levers[:-1] + ["learn"]) == 0
    capsys.readouterr()
    learned = load_package(out).manifest
    assert learned["selection"]["slot_scales"] == {"method": "learn", "sequences": 8}
    assert len(learned["slot_scales"]) == 6 and all(abs(a) <= 8 for a in learned["slot_scales"])
    assert all(a != b for a, b in zip(learned["slot_scales"], man["slot_scales"]))
    assert max(abs(a - b) for a, b in zip(learned["slot_scales"], man["slot_scales"])) < 0.2  # two small steps
    assert cloud_main(argv + ["--steps", "0"] + levers[:-1] + ["learn"]) == 2
    assert "--slot-scales learn trains the scales during distillation: give --steps > 0" in capsys.readouterr().err
    assert cloud_main(argv + ["--steps", "0", "--clusters", "2", "--max-cluster", "2"]) == 2
    assert "(at least 3 are needed); raise --clusters or --max-cluster" in capsys.readouterr().err
    assert cloud_main(argv + ["--steps", "0", "--clusters", "3"]) == 0  # defaults: no cap, no scales
    capsys.readouterr()
    man = load_package(out).manifest
    assert "slot_scales" not in man and "max_cluster" not in man["selection"]

"""Offsite-Tuning: layer selection, distillation, the package, offline tuning, push and plug-in eval via a real server."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

import tandem.emulator.distill as dmod
from tandem.client.errors import ClientError, ServerError
from tandem.client.offsite import eval_plugin, fetch_emulator, push_adapter
from tandem.client.trainer import TuneConfig, tune
from tandem.emulator.build import build_emulator
from tandem.emulator.distill import DistillConfig
from tandem.emulator.errors import EmulatorError, PackageError, SelectionError
from tandem.emulator.package import load_package
from tandem.emulator.select import kept_blocks, uniform_keep
from tandem.emulator.text import read_texts
from tandem.stages.loading import load_model
from tandem.stages.lora import LoraConfig
from tandem.stages.modules import StageLayout
from tandem.testing.models import ARCHS, make_model

DISTILL = dict(batch_size=4, seq_len=32, lr=3e-3, warmup=2, val_every=5, progress=False)


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


@pytest.fixture(scope="module")
def models8(tmp_path_factory):
    """Tiny models with 8 blocks: 2:2 leaves 4 middle blocks, of which half are dropped."""
    root = tmp_path_factory.mktemp("models8")
    return {a: make_model(a, str(root / a), layers=8) for a in ARCHS}


@pytest.fixture(scope="module")
def llama_pkg(models8, sample_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pkg") / "llama")
    build_emulator(models8["llama"], "2:2", out, sample_data, DistillConfig(steps=10, **DISTILL), drop_ratio=0.5)
    return out


def test_uniform_selection_keeps_first_and_last():
    assert uniform_keep(26, 13) == [0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25]  # stride 25/12, round(i*stride)
    for n in range(1, 30):
        for k in range(1, n + 1):
            kept = uniform_keep(n, k)
            assert len(kept) == k and kept[0] == 0 and (k == 1 or kept[-1] == n - 1)
    middle = list(range(2, 28))
    assert kept_blocks(middle, drop_ratio=0.5) == kept_blocks(middle, keep=13)
    assert kept_blocks(middle, keep=2) == [2, 27]
    with pytest.raises(SelectionError, match="exactly one"):
        kept_blocks(middle, drop_ratio=0.5, keep=3)
    with pytest.raises(SelectionError, match="choose 1..26"):
        kept_blocks(middle, keep=27)
    # The operator's own choice (--keep-blocks): the uniform 10 of SmolLM2 with its sink-making block 11 for 10.
    assert kept_blocks(middle, blocks=[2, 5, 8, 11, 13, 16, 19, 21, 24, 27]) == [2, 5, 8, 11, 13, 16, 19, 21, 24, 27]
    for bad in ([1, 5], [5, 5, 8], [], [2, 28]):
        with pytest.raises(SelectionError, match="distinct middle blocks"):
            kept_blocks(middle, blocks=bad)
    with pytest.raises(SelectionError, match="one of"):
        kept_blocks(middle, keep=3, blocks=[2, 27])


@pytest.mark.parametrize("arch", ARCHS)
def test_distillation_lowers_kd_loss(arch, models8, sample_data, tmp_path):
    m = build_emulator(
        models8[arch], "2:2", str(tmp_path / "pkg"), sample_data, DistillConfig(steps=10, **DISTILL), keep=2
    )
    d = m["distillation"]
    assert m["kept_middle_blocks"] == [2, 5]
    assert d["val_kd_after"] < 0.7 * d["val_kd_before"], d["val"]
    assert not os.path.exists(tmp_path / "pkg" / "distill_checkpoint.pt")
    assert len(load_package(str(tmp_path / "pkg")).emulator_blocks()) == 2


def test_distillation_resumes_to_the_uninterrupted_result(models8, sample_data, tmp_path, monkeypatch):
    out = str(tmp_path / "pkg")
    # With the Jacobian term: its perturbations are seeded by the step, so the resumed run draws the same ones.
    cfg = DistillConfig(**{**DISTILL, "steps": 4, "checkpoint_every": 2}, jacobian_weight=0.5)
    with pytest.raises(EmulatorError, match="no distill_checkpoint"):
        build_emulator(models8["gpt2"], "2:2", out, sample_data, replace(cfg, resume=True), keep=2)
    full = build_emulator(models8["gpt2"], "2:2", str(tmp_path / "full"), sample_data, cfg, keep=2)

    real, saved = dmod.save_checkpoint, []

    def save_then_stop(path, payload):  # an interruption right after the first checkpoint (step 2)
        real(path, payload)
        saved.append(payload["step"])
        raise KeyboardInterrupt

    monkeypatch.setattr(dmod, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        dmod.distill(load_model(models8["gpt2"]), StageLayout(8, 2, 2), [2, 5], read_texts(sample_data), cfg, out)
    monkeypatch.setattr(dmod, "save_checkpoint", real)
    assert saved == [2]
    for changed in ({"lr": cfg.lr * 2}, {"steps": 6}, {"kl_weight": 1.0}):  # the rest of the run would differ
        with pytest.raises(EmulatorError, match=f"other settings \\({next(iter(changed))}\\)"):
            build_emulator(models8["gpt2"], "2:2", out, sample_data, replace(cfg, resume=True, **changed), keep=2)
    resumed = build_emulator(models8["gpt2"], "2:2", out, sample_data, replace(cfg, resume=True), keep=2)
    assert resumed["files"]["emulator.safetensors"]["sha256"] == full["files"]["emulator.safetensors"]["sha256"]
    assert resumed["distillation"]["val_kd_after"] == full["distillation"]["val_kd_after"]


def test_distillation_resume_never_runs_code_from_a_planted_checkpoint(models8, sample_data, tmp_path, planted):
    """--resume loads tensors and plain values only: another object (or a damaged file) is refused, nothing runs."""
    (code, marker), out = planted, tmp_path / "pkg"
    out.mkdir()
    ckpt = out / dmod.CHECKPOINT
    cfg = DistillConfig(**{**DISTILL, "steps": 2}, resume=True)
    args = (load_model(models8["gpt2"]), StageLayout(8, 2, 2), [2, 5], read_texts(sample_data), cfg, str(out))
    for payload in ({"settings": code}, code, [1, 2], {"step": 2}):
        torch.save(payload, ckpt)
        with pytest.raises(EmulatorError, match="start fresh without --resume") as e:
            dmod.distill(*args)
        assert "\n" not in str(e.value) and not marker.exists()
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(EmulatorError, match="damaged"):
        dmod.distill(*args)
    ckpt.unlink()  # a real checkpoint of this run, edited: its settings match, its contents do not fit
    dmod.distill(*args[:4], replace(cfg, resume=False), str(out))
    real = torch.load(ckpt, weights_only=True)
    for key, value in (("student", None), ("student", {"0.bogus": torch.zeros(2)}), ("history", [1])):
        torch.save({**real, key: value} if value is not None else {k: v for k, v in real.items() if k != key}, ckpt)
        with pytest.raises(EmulatorError, match="does not fit this run.*start fresh without --resume") as e:
            dmod.distill(*args)
        assert "\n" not in str(e.value)


def test_a_diverging_distillation_stops_before_it_ships_nan_weights(models8, sample_data, tmp_path):
    cfg = DistillConfig(**{**DISTILL, "steps": 3, "lr": 1e30, "warmup": 0})
    with pytest.raises(EmulatorError, match="distillation diverged .* lower --lr") as e:
        build_emulator(models8["gpt2"], "2:2", str(tmp_path / "pkg"), sample_data, cfg, keep=2)
    assert "\n" not in str(e.value) and not os.path.exists(tmp_path / "pkg" / "manifest.json")


def test_package_never_contains_a_dropped_block(models8, llama_pkg, tmp_path):
    pkg = load_package(llama_pkg)
    man = pkg.manifest
    assert man["kept_middle_blocks"] == [2, 5] and man["dropped_middle_blocks"] == [3, 4]
    loaded = load_model(models8["llama"])
    state = loaded.model.state_dict()
    prefix = "model.layers."
    dropped = {
        _digest(v)
        for k, v in state.items()
        if v.dim() == 2 and int(k[len(prefix) :].split(".")[0] if k.startswith(prefix) else -1) in (3, 4)
    }
    shipped = {}
    for name in man["files"]:
        if name.endswith(".safetensors"):
            shipped.update({f"{name}:{k}": _digest(v) for k, v in load_file(pkg.file(name)).items()})
    assert dropped and not dropped & set(shipped.values()), "a dropped block's weight is in the package"
    # The check can see blocks: the (unchanged) client blocks are found by hash.
    client = {_digest(v) for k, v in state.items() if v.dim() == 2 and k.startswith("model.layers.0.")}
    assert client <= set(shipped.values())
    assert (
        man["params"]["package"] == man["params"]["client_stages"] + man["params"]["emulator"] < man["params"]["model"]
    )
    # Tampering is detected.
    bad = str(tmp_path / "bad")
    shutil.copytree(llama_pkg, bad)
    with open(os.path.join(bad, "emulator.safetensors"), "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\0\0\0\1")
    with pytest.raises(PackageError, match="SHA-256"):
        load_package(bad)


def _offsite_run(pkg, data, out, steps=12, **kw):
    cfg = TuneConfig(
        data=data,
        out=out,
        mode="offsite",
        emulator=pkg,
        steps=steps,
        batch_size=4,
        seq_len=32,
        lr=1e-2,
        lora=LoraConfig(rank=4, alpha=8),
        checkpoint_every=4,
        progress=False,
        **kw,
    )
    return tune(cfg)


def test_offline_tuning_needs_no_server_and_learns(llama_pkg, sample_data, tmp_path):
    out = str(tmp_path / "run")
    # No TransportConfig at all: an unreachable default server address would fail the test if used.
    r = _offsite_run(llama_pkg, sample_data, out, tune_client_blocks=True)
    assert r["mode"] == "offsite"
    assert r["totals"]["bytes_sent"] == r["totals"]["bytes_received"] == 0
    assert r["totals"]["train_bytes_sent"] == 0 and r["totals"]["one_time_bytes_received"] == 0
    assert r["validation"]["after"]["loss"] < r["validation"]["before"]["loss"]
    losses = [s["loss"] for s in r["steps"]]
    assert sum(losses[-3:]) < sum(losses[:3])
    adapter = load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))
    blocks = {int(k.split(".")[4]) for k in adapter}
    assert blocks == {0, 1, 6, 7}, "LoRA only on the client blocks, under full-model names"
    tuned = load_file(os.path.join(out, "adapter", "client_blocks.safetensors"))
    assert {int(k.split(".")[2]) for k in tuned} == {0, 1, 6, 7}
    again = _offsite_run(llama_pkg, sample_data, out, resume=True, tune_client_blocks=True)
    assert [s["step"] for s in again["steps"]] == list(range(12))


def load_model_vocab(model_dir: str) -> int:
    return json.load(open(os.path.join(model_dir, "config.json")))["vocab_size"]


def test_push_fetch_and_plugin_eval_through_a_real_server(models8, llama_pkg, sample_data, server_factory, tmp_path):
    registry = str(tmp_path / "registry")
    server = server_factory(models8["llama"], "--emulator", llama_pkg, "--adapter-registry", registry)
    tcfg = server.transport_cfg()

    got = fetch_emulator(tcfg, str(tmp_path / "fetched"))
    assert got["bytes_received"] >= sum(m["bytes"] for m in load_package(llama_pkg).manifest["files"].values())
    assert load_package(str(tmp_path / "fetched")).manifest == load_package(llama_pkg).manifest

    run = str(tmp_path / "run")
    _offsite_run(str(tmp_path / "fetched"), sample_data, run, steps=6)
    adapter = os.path.join(run, "adapter")
    r = push_adapter(tcfg, adapter, "mine")
    assert r["name"] == "mine" and r["blocks"] == [0, 1, 6, 7] and not r["already_registered"]
    assert r["bytes_sent"] < 64 * 1024, "only the adapter travels"
    assert push_adapter(tcfg, adapter, "mine")["already_registered"]
    assert json.load(open(os.path.join(registry, "mine", "registration.json")))["sha256"] == r["sha256"]

    # Mismatched adapters are rejected with a message that says what is wrong.
    other = str(tmp_path / "other")
    shutil.copytree(adapter, other)
    w = load_file(os.path.join(other, "adapter_model.safetensors"))
    key = next(k for k in w if "lora_A" in k)
    w[key] = torch.zeros(w[key].shape[0], w[key].shape[1] + 1)
    save_file(w, os.path.join(other, "adapter_model.safetensors"))
    with pytest.raises(ServerError, match=r"has shape .* the served model needs") as e:
        push_adapter(tcfg, other, "bad")
    assert e.value.reason == "adapter-rejected"
    gpt2_run = str(tmp_path / "gpt2run")
    tune(
        TuneConfig(
            data=sample_data,
            out=gpt2_run,
            mode="local",
            model=models8["gpt2"],
            steps=1,
            batch_size=2,
            seq_len=32,
            lora=LoraConfig(rank=4),
            middle_lora=False,
            progress=False,
        )
    )
    cfgp = os.path.join(gpt2_run, "adapter", "adapter_config.json")
    cfg = json.load(open(cfgp))
    cfg["base_model_name_or_path"] = "llama"  # even under the right name, the modules do not exist
    json.dump(cfg, open(cfgp, "w"))
    with pytest.raises(ServerError, match="does not have; was it tuned for another architecture"):
        push_adapter(tcfg, os.path.join(gpt2_run, "adapter"), "gpt2")
    head = str(tmp_path / "head")  # LoRA on lm_head: a Linear of the model, but not inside a block
    shutil.copytree(adapter, head)
    w = load_file(os.path.join(head, "adapter_model.safetensors"))
    r_ = w[key].shape[0]
    w["base_model.model.lm_head.lora_A.weight"] = torch.zeros(r_, 32)
    w["base_model.model.lm_head.lora_B.weight"] = torch.zeros(load_model_vocab(models8["llama"]), r_)
    save_file(w, os.path.join(head, "adapter_model.safetensors"))
    with pytest.raises(ServerError, match="outside the blocks") as e:
        push_adapter(tcfg, head, "head")
    assert e.value.reason == "adapter-rejected"
    changed = str(tmp_path / "changed")
    shutil.copytree(adapter, changed)
    w = load_file(os.path.join(changed, "adapter_model.safetensors"))
    w[key] = w[key] + 1.0
    save_file(w, os.path.join(changed, "adapter_model.safetensors"))
    with pytest.raises(ServerError, match="you registered another adapter as 'mine'.*another --name"):
        push_adapter(tcfg, changed, "mine")

    rep = eval_plugin(tcfg, adapter, sample_data, str(tmp_path / "eval"), seq_len=32, batch_size=4, name="mine")
    v = rep["validation"]
    assert v["plugged_in"]["loss"] < v["zero_shot"]["loss"]
    assert rep["bytes"]["per_kind"]["EvalForward"]["sent"] > 0
    assert os.path.exists(tmp_path / "eval" / "eval.json")
    with pytest.raises(ClientError, match="no adapter 'nope' is registered"):
        eval_plugin(tcfg, adapter, sample_data, str(tmp_path / "eval2"), seq_len=32, name="nope")


def test_fetch_without_emulator_says_what_to_do(tiny_models, server_factory, tmp_path):
    server = server_factory(tiny_models["gpt2"], "--adapter-registry", str(tmp_path / "reg"))
    with pytest.raises(ServerError, match="cloud serve --emulator PKG"):
        fetch_emulator(server.transport_cfg(), str(tmp_path / "x"))


def _distiller(path, keep=2):
    from tandem.emulator.model import copy_blocks
    from tandem.stages.arch import parts_of

    loaded = load_model(path)
    parts = parts_of(loaded.model)
    layout = StageLayout.parse("2:2", loaded.config)
    kept = kept_blocks(layout.middle_blocks, keep=keep)
    return dmod.Distiller(parts, layout, kept, copy_blocks(parts, kept)), parts


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("norm", ["global", "token"])
def test_rescaling_init_lowers_kd_loss_and_stays_standard_blocks(arch, norm, models8):
    d, parts = _distiller(models8[arch])
    with torch.no_grad():  # a redundant middle (blocks 3 and 4 repeat block 2): one kept block stands for three
        for i in (3, 4):
            parts.blocks[i].load_state_dict(parts.blocks[2].state_dict())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, parts.config.vocab_size, (8, 32), generator=g)
    cfg = DistillConfig(steps=0, batch_size=4, kd_norm=norm, init="rescale", progress=False)
    before = {k: v.clone() for k, v in d.student.state_dict().items()}

    def kd():
        with torch.no_grad():
            return float(d.losses(ids, cfg)["kd"])

    kd0 = kd()
    factors = d.rescale(ids, cfg)
    assert len(factors) == 2 and factors[0] > 1.5  # block 2 now writes about three blocks' update
    assert kd() < 0.7 * kd0
    # Folded into the weights: only the residual output projections change, by the fitted factor.
    after = d.student.state_dict()
    assert after.keys() == before.keys()
    outs = {"self_attn.o_proj", "mlp.down_proj", "attn.c_proj", "mlp.c_proj"}
    for k, v in after.items():
        j, rest = int(k.split(".")[0]), k.split(".", 1)[1]
        if rest.rsplit(".", 1)[0] in outs:
            assert torch.allclose(v, before[k] * factors[j], rtol=1e-5, atol=1e-7), k
        else:
            assert torch.equal(v, before[k]), k


def test_per_token_kd_is_not_dominated_by_one_massive_token():
    t = torch.randn(1, 8, 16)
    t[:, 0] *= 1000.0  # an attention-sink-like token
    s = t.clone()
    s[:, 1:] = 0.0  # right only on the massive token
    assert dmod.kd_loss(t, s) < 1e-3
    assert dmod.kd_loss(t, s, per_token=True) == pytest.approx(7 / 8)


def test_teacher_cache_gives_the_same_losses(models8):
    d, parts = _distiller(models8["llama"])
    ids = torch.randint(0, parts.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(1))
    cfg = DistillConfig(steps=0, batch_size=4, kl_weight=1.0, layer_weight=0.5, lm_weight=0.3, kd_norm="token")
    cache = dmod.TeacherCache(d, ids, cfg)
    idx = torch.tensor([5, 0, 3, 6])
    a, b = d.losses(ids[idx], cfg), d.losses(ids[idx], cfg, cache.get(idx))
    for k in ("loss", "kd", "lm", "kl", "layer"):
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), k
    assert float(a["kl"]) > 0 and float(a["layer"]) > 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rescale_kl_and_layer_distillation_lowers_losses(arch, models8, sample_data, tmp_path):
    cfg = DistillConfig(**{**DISTILL, "steps": 10}, init="rescale", kd_norm="token", kl_weight=1.0, layer_weight=1.0)
    m = build_emulator(models8[arch], "2:2", str(tmp_path / "pkg"), sample_data, cfg, keep=2)
    d = m["distillation"]
    first, fitted, last = d["val"][0], d["val"][1], d["val"][-1]
    assert first["init"] == "copy" and fitted["init"] == "rescale" and len(d["rescale_factors"]) == 2
    assert last["kd"] < fitted["kd"] and last["kl"] < first["kl"], d["val"]
    assert len(load_package(str(tmp_path / "pkg")).emulator_blocks()) == 2


def test_distill_config_rejects_bad_new_options():
    with pytest.raises(ValueError, match="init must be one of"):
        DistillConfig(init="svd")
    with pytest.raises(ValueError, match="kd_norm"):
        DistillConfig(kd_norm="layer")
    with pytest.raises(ValueError, match="not all 0"):
        DistillConfig(kd_weight=0.0)
    DistillConfig(kd_weight=0.0, kl_weight=1.0)  # KL alone is a valid objective


def test_the_sink_replaces_each_rows_first_real_token_only():
    from tandem.emulator.sink import apply_sink

    out = torch.randn(2, 5, 4, requires_grad=True)
    am = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])  # the second row is left-padded
    sink = torch.full((4,), 7.0)
    got = apply_sink(out, am, sink)
    assert torch.equal(got[0, 0], sink) and torch.equal(got[1, 2], sink)
    rest = torch.ones(2, 5, dtype=torch.bool)
    rest[0, 0] = rest[1, 2] = False
    assert torch.equal(got[rest], out[rest])
    got.sum().backward()
    assert out.grad[0, 0].abs().sum() == 0 and out.grad[1, 2].abs().sum() == 0 and bool(out.grad[rest].eq(1).all())


def test_a_measured_sink_travels_in_the_package_only_when_there_is_one(models8, sample_data, tmp_path):
    from transformers import AutoTokenizer

    from tandem.client.assemble import build_offsite
    from tandem.emulator.model import copy_blocks
    from tandem.emulator.package import build_package
    from tandem.emulator.sink import measure_sink
    from tandem.emulator.text import pack_blocks
    from tandem.stages.arch import parts_of

    loaded = load_model(models8["llama"])
    layout = StageLayout.parse("2:2", loaded.config)
    vec, stats = measure_sink(
        loaded, layout, pack_blocks(read_texts(sample_data), AutoTokenizer.from_pretrained(models8["llama"]), 16)
    )
    assert vec.shape == (loaded.config.hidden_size,) and {"ratio", "spread", "rms_first", "rms_other", "used"} <= set(
        stats
    )
    assert not stats["used"], "a tiny random model has no attention sink"
    blocks = copy_blocks(parts_of(loaded.model), [2, 5])
    for used in (False, True):
        out = str(tmp_path / f"pkg-{used}")
        build_package(loaded, layout, [2, 5], blocks, out, sink=(vec, dict(stats, used=used)))
        pkg = load_package(out)  # the sink file is covered by the manifest's SHA-256 like every other
        assert pkg.manifest["sink"]["used"] is used and ("sink.safetensors" in pkg.manifest["files"]) is used
        assert (pkg.sink() is not None) is used and (not used or torch.equal(pkg.sink(), vec))
        sm = build_offsite(out, LoraConfig(rank=4, alpha=8), 0)
        ids = torch.randint(0, 100, (2, 6))
        am = torch.ones_like(ids)
        with torch.no_grad():
            h = sm.middle.stage(sm.bottom(ids, am), am)
        assert torch.equal(h[:, 0], vec.expand(2, -1)) is used


def test_keep_sink_block_swaps_the_sinks_maker_in(models8, sample_data, tmp_path, monkeypatch, capsys):
    import tandem.emulator.sink as sink_mod
    from tandem.cloud.cli import main as cloud_main
    from tandem.emulator.sink import keep_sink_block

    made = {"used": True, "made_by_block": 11}
    assert keep_sink_block([2, 5, 8, 10, 13, 27], made) == ([2, 5, 8, 11, 13, 27], {"kept": 11, "instead_of": 10})
    assert keep_sink_block([2, 11, 27], made) == ([2, 11, 27], None)
    assert keep_sink_block([2, 10, 27], {"used": False, "made_by_block": 11}) == ([2, 10, 27], None)
    assert keep_sink_block([2, 27], made) == ([2, 27], None), "the first and last middle blocks stay"

    real = sink_mod.measure_sink  # a tiny random model has no sink: give it one made by block 3
    monkeypatch.setattr(sink_mod, "measure_sink", lambda *a: (real(*a)[0], {**real(*a)[1], **made, "made_by_block": 3}))
    argv = ["emulator", "build", "--model", models8["llama"], "--distill-data", sample_data, "--steps", "0"]
    argv += ["--keep", "3", "--seq-len", "16", "--no-progress", "--out", str(tmp_path / "pkg"), "--keep-sink-block"]
    assert cloud_main(argv) == 0  # uniform 3 of middle 2-5: 2, 4 (round(1.5)), 5 -> 2, 3, 5
    manifest = load_package(str(tmp_path / "pkg")).manifest
    assert manifest["kept_middle_blocks"] == [2, 3, 5]
    assert manifest["selection"]["sink_block"] == {"kept": 3, "instead_of": 4}
    capsys.readouterr()
    assert cloud_main([*argv[:-2], str(tmp_path / "p2"), "--keep-sink-block", "--select", "greedy"]) == 2
    assert "not with --select" in capsys.readouterr().err


def _loss_without(model_dir: str, drop: list[int], ids: torch.Tensor) -> float:
    """Oracle: the plain Hugging Face forward's loss with the given blocks removed from the model."""
    from tandem.stages.arch import parts_of

    model = load_model(model_dir).model.eval()
    dec = getattr(model, parts_of(model).arch.decoder)
    name = parts_of(model).arch.blocks
    blocks = [b for i, b in enumerate(getattr(dec, name)) if i not in drop]
    setattr(dec, name, torch.nn.ModuleList(blocks))
    for key in ("num_hidden_layers", "n_layer"):
        if getattr(model.config, key, None) is not None:
            setattr(model.config, key, len(blocks))
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids, use_cache=False).loss)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_selection_drops_the_block_that_costs_least(arch, tmp_path):
    from tandem.emulator.greedy import greedy_keep
    from tandem.stages.arch import parts_of

    path = make_model(arch, str(tmp_path / arch), layers=10, seed=3)
    loaded = load_model(path)
    layout = StageLayout.parse("2:2", loaded.config)  # middle 2..7
    ids = torch.randint(5, 200, (6, 16), generator=torch.Generator().manual_seed(0))
    kept, hist = greedy_keep(parts_of(loaded.model), layout, ids, 3, batch_size=4)
    assert len(kept) == 3 and kept[0] == 2 and kept[-1] == 7 and sorted(kept) == kept
    assert [h["left"] for h in hist] == [5, 4, 3] and sorted(
        kept + [h["dropped"] for h in hist]
    ) == layout.middle_blocks
    # The first elimination, against the plain model's loss for every candidate (2 and 7 are never candidates).
    trials = {b: _loss_without(path, [b], ids) for b in range(3, 7)}
    assert hist[0]["dropped"] == min(trials, key=trials.get)
    assert hist[0]["loss"] == pytest.approx(trials[hist[0]["dropped"]], abs=1e-4)
    # The last elimination's loss is that of the model with exactly the dropped blocks removed.
    assert hist[-1]["loss"] == pytest.approx(_loss_without(path, [h["dropped"] for h in hist], ids), abs=1e-4)


def test_greedy_build_records_and_reuses_its_selection(models8, sample_data, tmp_path, monkeypatch):
    import tandem.emulator.greedy as gmod

    out = str(tmp_path / "pkg")
    cfg = DistillConfig(steps=0, **DISTILL)
    m = build_emulator(models8["llama"], "2:2", out, sample_data, cfg, keep=2, select="greedy", select_seqs=4)
    assert m["selection"]["method"] == "greedy" and m["kept_middle_blocks"] == [2, 5]  # keep=2: first and last
    assert sorted(h["dropped"] for h in m["selection"]["history"]) == [3, 4]
    assert not os.path.exists(os.path.join(out, gmod.SELECTION_FILE))
    m = build_emulator(models8["llama"], "2:2", out, sample_data, cfg, keep=3, select="greedy", select_seqs=4)
    assert m["selection"]["method"] == "greedy" and len(m["kept_middle_blocks"]) == 3
    assert [h["dropped"] for h in m["selection"]["history"]] == [
        b for b in (2, 3, 4, 5) if b not in m["kept_middle_blocks"]
    ]
    assert load_package(out).manifest["selection"] == m["selection"]
    assert build_emulator(models8["llama"], "2:2", out, sample_data, cfg, keep=2)["selection"] == {"method": "uniform"}
    # A build interrupted after the selection reuses it (same model, layout, count and text), and only then.
    key = {"k": 1}
    saved = {"method": "greedy", "kept": [2, 3, 5], "history": [], "sequences": 4, "tokens": 128}
    with open(os.path.join(out, gmod.SELECTION_FILE), "w") as f:
        json.dump({"key": key, "selection": saved}, f)

    def no_rerun(*a, **k):
        raise AssertionError("the saved selection should have been reused")

    monkeypatch.setattr(gmod, "greedy_keep", no_rerun)
    assert gmod.selection(None, None, torch.zeros(4, 32), 3, out, key) == saved
    with pytest.raises(AssertionError, match="reused"):
        gmod.selection(None, None, torch.zeros(4, 32), 3, out, {"k": 2})


def test_greedy_selection_errors_say_what_to_do(models8, sample_data, tmp_path):
    cfg = DistillConfig(steps=0, **DISTILL)
    with pytest.raises(SelectionError, match="not --keep-blocks"):
        build_emulator(
            models8["llama"], "2:2", str(tmp_path / "a"), sample_data, cfg, keep_blocks=[2, 5], select="greedy"
        )
    with pytest.raises(SelectionError, match="--distill-data"):
        build_emulator(models8["llama"], "2:2", str(tmp_path / "b"), None, cfg, keep=2, select="greedy")
    with pytest.raises(SelectionError, match="uniform, greedy or gradient"):
        build_emulator(models8["llama"], "2:2", str(tmp_path / "c"), sample_data, cfg, keep=2, select="best")
    with pytest.raises(SelectionError, match="choose 2..4"):
        build_emulator(models8["llama"], "2:2", str(tmp_path / "d"), sample_data, cfg, keep=1, select="greedy")


def test_jacobian_term_is_a_finite_difference_match(models8):
    d, parts = _distiller(models8["llama"], keep=4)  # every middle block kept: the student is the teacher
    ids = torch.randint(0, parts.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(2))
    cfg = DistillConfig(steps=0, batch_size=4, kd_norm="token", jacobian_weight=1.0, jacobian_eps=0.05)
    with torch.no_grad():
        assert float(d.losses(ids, cfg, step=3)["jac"]) < 1e-8
    d, parts = _distiller(models8["llama"], keep=2)
    with torch.no_grad():
        a, b, c = (d.losses(ids, cfg, step=s) for s in (3, 3, 4))
        # By hand: the same perturbation (seeded by cfg.seed and the step) through the teacher and the student.
        teacher = d.teacher(ids, cfg)
        am = torch.ones_like(ids)
        h, t = teacher["h"], teacher["targets"][-1]
        rms = h.pow(2).mean(-1, keepdim=True).sqrt()
        moved = h + 0.05 * rms * torch.randn(h.shape, generator=torch.Generator().manual_seed(4))
        dt = dmod.run_blocks(parts, [parts.blocks[i] for i in range(2, 6)], moved, am) - t
        ds = dmod.run_blocks(parts, d.student, moved, am) - dmod.run_blocks(parts, d.student, h, am)
        want = ((dt - ds).pow(2).sum(-1) / dt.pow(2).sum(-1)).mean()
    assert float(a["jac"]) == float(b["jac"]) and float(a["jac"]) != float(c["jac"])  # deterministic per step
    assert float(a["jac"]) == pytest.approx(float(want), rel=1e-5)
    assert float(a["loss"]) == pytest.approx(float(a["kd"] + a["jac"]), rel=1e-6)


def test_jacobian_distillation_lowers_the_term(models8, sample_data, tmp_path):
    cfg = DistillConfig(**{**DISTILL, "steps": 10}, kd_norm="token", jacobian_weight=1.0, jacobian_eps=0.1)
    m = build_emulator(models8["gpt2"], "2:2", str(tmp_path / "pkg"), sample_data, cfg, keep=2)
    val = m["distillation"]["val"]
    assert val[-1]["jac"] < 0.8 * val[0]["jac"] and val[-1]["kd"] < val[0]["kd"], val
    with pytest.raises(ValueError, match="jacobian_eps"):
        DistillConfig(jacobian_weight=1.0, jacobian_eps=0.0)


@pytest.mark.parametrize("arch", ARCHS)
def test_width_pruning_equals_the_block_with_its_other_neurons_silenced(arch, tmp_path):
    from tandem.emulator.model import copy_blocks
    from tandem.emulator.prune import mlp_layers, mlp_width_of, neuron_scores, prune_blocks
    from tandem.stages.arch import parts_of
    from tandem.stages.modules import run_blocks

    loaded = load_model(make_model(arch, str(tmp_path / arch), layers=6, seed=2))
    parts, layout = parts_of(loaded.model), StageLayout.parse("1:1", loaded.config)  # middle 1..4
    ids = torch.randint(5, 200, (3, 16), generator=torch.Generator().manual_seed(0))
    kept = [1, 3, 4]
    scores = neuron_scores(parts, layout, kept, ids, batch_size=2)
    full = mlp_width_of(parts.blocks[1])
    # Block 1's scores by hand: the RMS of its output projection's input times that projection's column norms.
    seen = []
    hook = mlp_layers(parts.blocks[1])[1].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        loaded.model(input_ids=ids)
    hook.remove()
    out = mlp_layers(parts.blocks[1])[1]
    cols = out.weight.norm(dim=0) if isinstance(out, torch.nn.Linear) else out.weight.norm(dim=1)
    assert torch.allclose(scores[1], seen[0].pow(2).mean(dim=(0, 1)).sqrt() * cols, rtol=1e-4)

    blocks = copy_blocks(parts, kept)
    rec = prune_blocks(blocks, kept, scores, full // 4)
    assert (
        rec["mlp_width"] == full // 4 and rec["from_width"] == full and all(0 < s < 1 for s in rec["kept_score_share"])
    )
    assert all(mlp_width_of(b) == full // 4 for b in blocks)
    # Oracle: the full block with every neuron outside the kept ones zeroed at the output projection's input.
    keep = torch.topk(scores[3], full // 4).indices
    mask = torch.zeros(full)
    mask[keep] = 1.0
    h = torch.randn(2, 16, loaded.config.hidden_size if arch != "gpt2" else loaded.config.n_embd)
    am = torch.ones(2, 16, dtype=torch.long)
    hook = mlp_layers(parts.blocks[3])[1].register_forward_pre_hook(lambda m, a: (a[0] * mask,))
    with torch.no_grad():
        want = run_blocks(parts, [parts.blocks[3]], h, am)
        hook.remove()
        got = run_blocks(parts, [blocks[1]], h, am)
        assert torch.allclose(got, want, atol=1e-5)
        assert not torch.allclose(run_blocks(parts, [parts.blocks[3]], h, am), want, atol=1e-3)  # pruning did change it
    # Keeping every neuron leaves a block as it was.
    whole = copy_blocks(parts, [4])
    prune_blocks(whole, [4], scores, full)
    with torch.no_grad():
        assert torch.equal(run_blocks(parts, whole, h, am), run_blocks(parts, [parts.blocks[4]], h, am))
    with pytest.raises(SelectionError, match=f"choose 1..{full}"):
        prune_blocks(copy_blocks(parts, [4]), [4], scores, full + 1)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_width_pruned_package_distills_ships_and_tunes(arch, models8, sample_data, tmp_path):
    from tandem.emulator.prune import mlp_width_of

    out = str(tmp_path / "pkg")
    narrow = build_emulator(
        models8[arch], "2:2", out, sample_data, DistillConfig(steps=10, **DISTILL), keep=2, mlp_width=8
    )
    wide = build_emulator(
        models8[arch], "2:2", str(tmp_path / "wide"), sample_data, DistillConfig(steps=0, **DISTILL), keep=2
    )
    assert narrow["pruning"]["mlp_width"] == 8 and wide["pruning"] == {"mlp_width": None}
    assert narrow["kept_middle_blocks"] == [2, 5]
    assert narrow["params"]["emulator"] < 0.6 * wide["params"]["emulator"]
    d = narrow["distillation"]
    assert d["val_kd_after"] < 0.7 * d["val_kd_before"], d["val"]
    pkg = load_package(out)
    assert pkg.mlp_width == 8 and all(mlp_width_of(b) == 8 for b in pkg.emulator_blocks())
    r = _offsite_run(out, sample_data, str(tmp_path / "run"))
    assert r["validation"]["after"]["loss"] < r["validation"]["before"]["loss"]
    with pytest.raises(SelectionError, match="--distill-data"):
        build_emulator(
            models8[arch], "2:2", str(tmp_path / "x"), None, DistillConfig(steps=0, **DISTILL), keep=4, mlp_width=8
        )

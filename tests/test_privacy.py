"""The privacy audit: the attacks are real, noise weakens them, labels never travel, the audit reads what was sent."""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch

from tandem.client.assemble import connect_split
from tandem.client.data import load_split
from tandem.client.errors import ClientError
from tandem.client.privacy import attacks
from tandem.client.privacy.cloud_view import read_cloud_view
from tandem.client.privacy.defenses import CutNoise, gaussian_delta, gaussian_epsilon
from tandem.client.privacy.record import AuditRecorder
from tandem.client.trainer import TuneConfig, tune
from tandem.client.transport import Transport
from tandem.protos import serde
from tandem.protos import split_pb2 as pb
from tandem.stages.arch import parts_of
from tandem.stages.loading import client_state, load_model
from tandem.stages.lora import LoraConfig
from tandem.stages.modules import StageLayout
from tandem.testing.models import ARCHS


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _known(model_dir: str, k: int):
    from transformers import AutoTokenizer

    m = load_model(model_dir)
    layout = StageLayout(6, k, 1)
    return attacks.KnownStages.build(
        m.config, layout, client_state(parts_of(m.model), layout)
    ), AutoTokenizer.from_pretrained(model_dir)


def _recovery(known, tok, ids, noise: float) -> dict:
    """Token recovery of each attack on (B, T) ids, at a noise multiplier (clip norm: the median)."""
    h = known.bottom(ids, torch.ones_like(ids))  # (B, T, H)
    defense = None
    if noise:
        defense = CutNoise(noise, float(h[:, 1:].norm(dim=-1).median()), float(h[:, 0].norm(dim=-1).median()))
        h = defense(h, None, 0, 1, True)
    inv = attacks.RidgeInverter(known, attacks.public_ids(tok, 2048, 64), defense)
    flat, truth = h.reshape(-1, h.shape[-1]), ids.reshape(-1)
    top = inv.scores(flat).topk(8, -1).indices.view(*ids.shape, 8)
    search = torch.stack([attacks.search_attack(known, h[b], top[b], defense) for b in range(len(ids))])
    return {
        "logit_lens": float((attacks.logit_lens(known, flat) == truth).float().mean()),
        "nearest_embedding": float((attacks.nearest_embedding(known, flat, inv.mean) == truth).float().mean()),
        "learned_inverter": float((top[..., 0] == ids).float().mean()),
        "search": float((search == ids).float().mean()),
    }


@pytest.mark.parametrize("arch", ARCHS)
def test_attacks_recover_everything_at_k1_and_noise_defeats_them(arch, tiny_models, sample_data):
    known, tok = _known(tiny_models[arch], 1)
    text = _read(os.path.join(sample_data, "notes.txt")).decode()
    ids = torch.tensor(tok(text)["input_ids"][:128]).view(2, 64)
    clean = _recovery(known, tok, ids, 0.0)
    assert clean["nearest_embedding"] >= 0.9 and clean["search"] >= 0.95, clean
    assert clean["learned_inverter"] >= 0.85, clean
    if arch == "llama":  # tied head: the logit lens reads the embedding back (random untied heads cannot)
        assert clean["logit_lens"] >= 0.9, clean
    noisy = _recovery(known, tok, ids, 0.3)
    loud = _recovery(known, tok, ids, 1.0)
    for name in ("nearest_embedding", "learned_inverter", "search"):
        assert loud[name] < noisy[name] < clean[name], (name, clean, noisy, loud)
        assert loud[name] < 0.3


def test_masked_search_pass_equals_the_plain_forward(tiny_models):
    """The search's one-pass scoring (candidates see only their prefix) equals running each prefix."""
    for arch in ARCHS:
        known, _ = _known(tiny_models[arch], 2)
        ids = torch.randint(0, 200, (1, 12))
        plain = known.bottom(ids, torch.ones_like(ids))[0]  # (T, H)
        t = 12
        seq = torch.cat([ids[0], torch.tensor([7, 9])])
        pos = torch.cat([torch.arange(t), torch.tensor([5, 5])])
        allow = torch.zeros(t + 2, t + 2, dtype=torch.bool)
        allow[:t, :t] = torch.ones(t, t, dtype=torch.bool).tril()
        allow[t:, :5] = True
        allow[t, t] = allow[t + 1, t + 1] = True
        out = known.bottom_masked(seq, pos, allow)
        assert torch.allclose(out[:t], plain, atol=1e-5)
        for j, tokn in enumerate((7, 9)):
            alt = torch.cat([ids[0, :5], torch.tensor([tokn])]).unsqueeze(0)
            assert torch.allclose(out[t + j], known.bottom(alt, torch.ones_like(alt))[0, 5], atol=1e-5), arch


def test_rouge_l_and_epsilon():
    assert attacks.lcs("abcbdab", "bdcaba") == 4
    assert attacks.rouge_l(["a", "b", "c"], ["a", "b", "c"]) == 1.0
    assert attacks.rouge_l(["a", "b"], ["c"]) == 0.0
    assert attacks.rouge_l(list("abcd"), list("acd")) == pytest.approx(2 * 1.0 * 0.75 / 1.75)
    eps = gaussian_epsilon(2.0, 1e-5)
    assert gaussian_delta(eps, 2.0) == pytest.approx(1e-5, rel=1e-3)
    assert gaussian_epsilon(4.0) < eps < gaussian_epsilon(1.0)


# Reviewed inventory of every field the cloud may receive; a new field fails here until someone checks it carries no ids.
ALLOWED = {
    "OpenSession": {"model_id", "lora", "remote_lora", "codec", "gradient_codec", "lora_codec", "seal_public_key"},
    "Forward": {"session_id", "step", "hidden", "attention_mask", "lora_version", "lora", "dropout_seed", "train"},
    "EvalForward": {"session_id", "step", "hidden", "attention_mask", "lora_version", "lora", "dropout_seed", "train"},
    "Backward": {"session_id", "step", "grad_output"},
    "CloseSession": {"session_id"},
}


def test_no_label_or_token_id_reaches_the_cloud(tiny_models, sample_data, server_factory, tmp_path):
    """Every message the cloud receives in a run, all kinds: no integer tensor, no ids, no labels."""
    server = server_factory(tiny_models["llama"])
    rec = AuditRecorder(str(tmp_path), kinds=tuple(ALLOWED))
    rec.steps = set(range(100))
    t = Transport(server.transport_cfg(), recorder=rec)
    sm = connect_split(t, LoraConfig(rank=2), seed=0)
    rec.sealer_of = lambda: sm.middle.session.sealer
    data = load_split(sample_data, sm.tokenizer, seq_len=24, batch_size=3, seed=0, val_fraction=0.1)
    opt = torch.optim.AdamW(sm.adapter.parameters(), lr=1e-2)
    seen = []
    for step in range(3):
        batch = data.batch_at(step)
        seen.append(batch)
        opt.zero_grad()
        loss, _ = sm.loss(batch, step, 0, train=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        sm.loss(data.val.batch(torch.arange(1)), -1, 0, train=False)
    sm.close()
    t.close()

    files = sorted(glob.glob(os.path.join(rec.dir, "*.bin")))
    kinds = {os.path.basename(f).rsplit("-", 1)[0] for f in files}
    assert kinds == set(ALLOWED), kinds
    id_rows = [r for b in seen for key in ("input_ids", "labels") for r in b[key]]
    patterns = [r[:6].numpy().astype(dt).tobytes() for r in id_rows for dt in ("<i8", "<i4")]
    for path in files:
        kind = os.path.basename(path).rsplit("-", 1)[0]
        raw = _read(path)
        msg = getattr(pb, f"{kind.removeprefix('Eval')}Request").FromString(raw)
        names = {fd.name for fd, _ in msg.ListFields()}
        assert names <= ALLOWED[kind], (kind, names - ALLOWED[kind])
        for fd, value in msg.ListFields():
            if isinstance(value, pb.Tensor):
                assert not value.sealed
                assert value.dtype in (pb.FLOAT32, pb.UINT8), (kind, fd.name, pb.DType.Name(value.dtype))
                x = serde.from_proto(value)
                if value.dtype == pb.UINT8:
                    assert fd.name == "attention_mask" and set(x.unique().tolist()) <= {0, 1}
                for r in id_rows:
                    assert x.numel() < r.numel() or not torch.equal(x.reshape(-1)[: r.numel()].long(), r)
        for p in patterns:
            assert p not in raw, f"{path}: a token-id or label sequence appears in the bytes the cloud received"


def _tune(tmp_path, name, sample_data, **kw):
    common = {
        "data": sample_data,
        "steps": 3,
        "batch_size": 2,
        "seq_len": 32,
        "lr": 1e-2,
        "lora": LoraConfig(rank=2),
        "progress": False,
    }
    return tune(TuneConfig(out=str(tmp_path / name), **{**common, **kw["cfg"]}), kw.get("tcfg"))


def test_split_audit_attacks_the_recorded_requests(tiny_models, sample_data, server_factory, tmp_path, monkeypatch):
    """The report's privacy section comes from cloud_view/: tampering with it changes the audit, removing it fails it.

    With --noise-multiplier, split and local mode give the same losses (the same key and seeds) and the audit states
    epsilon.
    """
    from tandem.client.privacy import record
    from tandem.client.privacy.audit import audit_run

    server = server_factory(tiny_models["llama"], "--client-blocks", "1:1")
    report = _tune(tmp_path, "s", sample_data, cfg={}, tcfg=server.transport_cfg())
    p = report["privacy"]
    assert p["measured"] and p["cut_after_block"] == 1 and p["sample"]["tokens"] > 0
    assert p["strongest"]["token_recovery"] >= 0.9, p["note"]
    assert p["labels"]["gradient_attack"]["labels"] > 0
    assert set(p["received"]) == {"Forward", "EvalForward", "Backward"}
    assert p["received"]["Forward"]["hidden"] == "FLOAT32"
    assert json.loads(_read(tmp_path / "s" / "report.json"))["privacy"]["measured"]

    noisy = {"noise_multiplier": 1.0, "client_blocks": "1:1"}
    key = bytes(range(32))
    monkeypatch.setattr(record, "new_secret", lambda: key)  # both runs draw the same noise
    a = _tune(tmp_path, "split", sample_data, cfg=noisy, tcfg=server.transport_cfg())
    b = _tune(
        tmp_path, "local", sample_data, cfg={**noisy, "mode": "local", "model": tiny_models["llama"], "audit": "yes"}
    )
    assert [s["loss"] for s in a["steps"]] == pytest.approx([s["loss"] for s in b["steps"]], rel=1e-5)
    assert a["validation"]["after"]["loss"] == pytest.approx(b["validation"]["after"]["loss"], rel=1e-5)
    for r in (a, b):
        noise = r["privacy"]["defenses"]["cut_noise"]
        assert noise["noise_multiplier"] == 1.0 and noise["epsilon_per_release"] > 0
        assert "ONE release" in noise["assumptions"]
        forward_only = max(a["token_recovery"] for a in r["privacy"]["attacks"]["known"].values())
        assert forward_only < 0.5 < p["strongest"]["token_recovery"]  # the adaptive attacker reads the gradients too
        assert r["privacy"]["adaptive"]["chose"]["alignment"] != "noise_replay"  # the seed alone cannot replay it

    # What the audit attacks is exactly what crossed the wire: step 0 (bottom LoRA still zero) equals the shipped stage.
    run = str(tmp_path / "s")
    view = read_cloud_view(run)
    first = min((r for r in view if r.kind == "Forward"), key=lambda r: r.step)
    known, tok = _known(tiny_models["llama"], 1)
    data = load_split(sample_data, tok, 32, 2, 0, 0.1)
    ids = data.batch_at(first.step)["input_ids"]
    assert torch.allclose(first.hidden, known.bottom(ids, torch.ones_like(ids)), atol=1e-5)

    for path in glob.glob(os.path.join(run, "cloud_view", "Forward-*.bin")):  # the cloud received zeros instead
        msg = pb.ForwardRequest.FromString(_read(path))
        msg.hidden.CopyFrom(serde.to_proto(torch.zeros(tuple(msg.hidden.shape))))
        with open(path, "wb") as f:
            f.write(msg.SerializeToString())
    tampered = audit_run(run, report["config"], tokens=64, search_tokens=32)
    forward_only = max(a["token_recovery"] for a in tampered["attacks"]["known"].values())
    assert forward_only < 0.5 < p["strongest"]["token_recovery"]
    for path in glob.glob(os.path.join(run, "cloud_view", "Forward-*.bin")):
        os.remove(path)
    with pytest.raises(ClientError, match="no recorded Forward"):
        audit_run(run, report["config"])

"""The trained defenses the cloud never sees (issue #22 item 1): the private bottom and label noise at the top cut.

Real `cloud serve` processes with TLS and a recording hop in front (unsealed, so the hop reads what the cloud reads).
"""

from __future__ import annotations

import json
import os
import socket
import stat

import pytest
import torch
from safetensors.torch import load_file

from tandem.client.assemble import connect_split
from tandem.client.cli import main
from tandem.client.privacy import private_bottom
from tandem.client.privacy.attacks import KnownStages, public_ids
from tandem.client.privacy.label_defense import LabelNoise
from tandem.client.privacy.private_bottom import PRIVATE_BOTTOM_FILE, PrivateBottom, train_private_bottom
from tandem.client.trainer import TuneConfig, tune
from tandem.client.transport import Transport
from tandem.protos import serde
from tandem.protos import split_pb2 as pb
from tandem.stages.adapter_files import read_adapter_dir
from tandem.stages.arch import parts_of
from tandem.stages.loading import client_state, load_model
from tandem.stages.lora import LoraConfig
from tandem.stages.modules import StageLayout
from tandem.testing.cli_errors import one_line_error
from tandem.testing.proxies import Hop

CUT = ("--client-blocks", "2:2")
DEFENDED = {"private_bottom": 1.0, "private_warmup": 2, "private_lr": 1e-3, "label_noise": 2.0}


def _cfg(data, out, **kw) -> TuneConfig:
    base = dict(
        data=data,
        out=str(out),
        steps=3,
        batch_size=2,
        seq_len=24,
        lr=1e-2,
        lora=LoraConfig(rank=2),
        checkpoint_every=100,
        audit="no",
        progress=False,
    )
    return TuneConfig(**(base | kw))


def _tensors(msg) -> dict[str, pb.Tensor]:
    return {fd.name: v for fd, v in msg.ListFields() if isinstance(v, pb.Tensor)}


def _carries(messages, weights: list[torch.Tensor]) -> list[str]:
    """Which messages carry one of `weights`: as a decoded tensor (equal values), or 8 of its floats in the bytes."""
    found = []
    patterns = [w.reshape(-1)[w.numel() // 2 : w.numel() // 2 + 8].float().numpy().tobytes() for w in weights]
    for method, msg in messages:
        raw = msg.SerializeToString()
        for name, tensor in _tensors(msg).items():
            x = serde.from_proto(tensor)
            if any(
                x.numel() == w.numel() and torch.equal(x.reshape(-1).float(), w.reshape(-1).float()) for w in weights
            ):
                found.append(f"{method}.{name}")
        found += [f"{method} (bytes)" for p in patterns if p in raw]
    return found


def _split_run(server, data, out, **kw):
    hop = Hop(server)
    try:
        report = tune(_cfg(data, out, **kw), hop.transport_cfg(seal=False))
    finally:
        hop.close()
    return report, list(hop.seen)


def test_defenses_change_nothing_that_travels_and_no_private_weight_reaches_the_cloud(
    tiny_models, sample_data, server_factory, tmp_path, monkeypatch
):
    """A defended and an undefended run through a recording hop: the same messages (methods, tensor shapes, dtypes,
    sizes) and the same accounted bytes per step; no message carries a weight of the private bottom at any step,
    although those weights changed from the shipped ones (the check can fail: a planted weight is found)."""
    server = server_factory(tiny_models["llama"], *CUT)
    used: list[list[torch.Tensor]] = []  # the private bottom's weights as each training step's forward used them
    real_loss = PrivateBottom.loss
    monkeypatch.setattr(
        PrivateBottom, "loss", lambda self: used.append([p.detach().clone() for p in self.params]) or real_loss(self)
    )
    plain, plain_seen = _split_run(server, sample_data, tmp_path / "plain")
    defended, defended_seen = _split_run(server, sample_data, tmp_path / "defended", **DEFENDED)

    assert [m for m, _ in plain_seen] == [m for m, _ in defended_seen]
    for (method, a), (_, b) in zip(plain_seen, defended_seen):
        assert a.ByteSize() == b.ByteSize(), method
        ta, tb = _tensors(a), _tensors(b)
        assert {k: (list(v.shape), v.dtype) for k, v in ta.items()} == {
            k: (list(v.shape), v.dtype) for k, v in tb.items()
        }
    keys = ("bytes_sent", "bytes_received")
    assert [[s[k] for k in keys] for s in plain["steps"]] == [[s[k] for k in keys] for s in defended["steps"]]
    for key in ("per_kind", "train_bytes_sent", "train_bytes_received"):  # one_time: the stages are cached now
        assert plain["totals"][key] == defended["totals"][key], key

    run = tmp_path / "defended"
    saved = load_file(str(run / PRIVATE_BOTTOM_FILE))
    assert stat.S_IMODE(os.stat(run / PRIVATE_BOTTOM_FILE).st_mode) == 0o600
    assert PRIVATE_BOTTOM_FILE not in read_adapter_dir(str(run / "adapter"))  # what `client push` sends
    shipped = load_model(tiny_models["llama"]).model.state_dict()  # full-model key names, as the file has
    changed = [v for k, v in saved.items() if k in shipped and not torch.equal(v, shipped[k])]
    assert len(used) == 3 and len(changed) >= len(saved) // 2, "the private bottom did not train"
    weights = [w for step in used for w in step if w.numel() >= 8] + changed
    assert not _carries(defended_seen, weights)
    planted = pb.ForwardRequest(hidden=serde.to_proto(changed[0].float()))
    assert _carries([("Forward", planted)], weights) == ["Forward.hidden", "Forward (bytes)"]

    context = json.loads((run / "privacy_context.json").read_text())
    assert context["private_bottom"]["weight"] == 1.0 and context["private_bottom"]["warmup"] == 2
    assert context["label_defense"]["scale"] == 2.0
    assert "seed" not in json.dumps(context) and "secret" not in json.dumps(context)


def test_label_noise_changes_the_gradient_sent_down_but_not_the_top_update(tiny_models, sample_data, server_factory):
    """The same step twice, with and without --label-noise: the Backward's grad_output differs by noise of about
    X times each token's norm; the top adapter's gradient is bit for bit the same, the bottom's is not."""
    from tandem.client.data import load_split

    server = server_factory(tiny_models["llama"], *CUT)
    hop = Hop(server)
    grads, sent = [], []
    try:
        for noise in (0.0, 2.0):
            transport = Transport(hop.transport_cfg(seal=False))
            model = connect_split(transport, LoraConfig(rank=2), seed=0)
            if noise:
                LabelNoise(noise).install(model)
            data = load_split(sample_data, model.tokenizer, seq_len=24, batch_size=2, seed=0, val_fraction=0.1)
            loss, _ = model.loss(data.batch_at(0), 0, 0, train=True)
            loss.backward()
            bottom_names, _, top_names = model.names
            grads.append([[p.grad.clone() for p in model.adapter.params_for(n)] for n in (bottom_names, top_names)])
            model.close()
            transport.close()
            sent.append(next(r for m, r in reversed(hop.seen) if m == "Backward"))
    finally:
        hop.close()
    (bottom_a, top_a), (bottom_b, top_b) = grads
    assert top_a and all(torch.equal(a, b) for a, b in zip(top_a, top_b))
    assert not all(torch.equal(a, b) for a, b in zip(bottom_a, bottom_b))
    exact, noisy = (serde.from_proto(r.grad_output) for r in sent)
    assert exact.shape == noisy.shape and sent[0].grad_output.dtype == sent[1].grad_output.dtype
    norms = exact.norm(dim=-1)
    live = norms > 0
    ratio = ((noisy - exact).norm(dim=-1)[live] / norms[live]).mean()
    assert 1.5 < float(ratio) < 2.5, float(ratio)


def test_private_bottom_in_local_mode_resumes_and_its_shadow_runs(tiny_models, sample_data, tmp_path, monkeypatch):
    """Local mode (the benchmark's stand-in): a run resumed half-way ends where the uninterrupted one does; the
    shadow (the adaptive attacker's re-run on public text) is seeded by the attacker, and leaves its parts alone."""
    local = {"mode": "local", "model": tiny_models["llama"], "client_blocks": "2:2", "checkpoint_every": 2, **DEFENDED}
    monkeypatch.setattr(private_bottom, "new_secret", lambda: bytes(32))  # the whole and the halved run: one key
    whole = tune(_cfg(sample_data, tmp_path / "whole", steps=4, **(local | {"label_noise": 0.0})))
    tune(_cfg(sample_data, tmp_path / "half", steps=2, **(local | {"label_noise": 0.0})))
    resumed = tune(_cfg(sample_data, tmp_path / "half", steps=4, resume=True, **(local | {"label_noise": 0.0})))
    assert [s["loss"] for s in resumed["steps"]] == pytest.approx([s["loss"] for s in whole["steps"]], rel=1e-6)
    a, b = (load_file(str(tmp_path / r / PRIVATE_BOTTOM_FILE)) for r in ("whole", "half"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # The label noise's secret (never in the context) is kept in the private checkpoint and resumed with it.
    tune(_cfg(sample_data, tmp_path / "noisy", steps=2, **local))
    first = torch.load(tmp_path / "noisy" / "checkpoint.pt", weights_only=True)["label_noise"]
    tune(_cfg(sample_data, tmp_path / "noisy", steps=4, resume=True, **local))
    second = torch.load(tmp_path / "noisy" / "checkpoint.pt", weights_only=True)["label_noise"]
    assert first["secret"] == second["secret"]

    model = load_model(tiny_models["llama"])
    layout = StageLayout(6, 2, 2)
    known = KnownStages.build(model.config, layout, client_state(parts_of(model.model), layout))
    before = [v.clone() for v in known.parts.blocks[0].state_dict().values()]
    from transformers import AutoTokenizer

    ids = public_ids(AutoTokenizer.from_pretrained(tiny_models["llama"]), 512, 16)
    context = json.loads((tmp_path / "whole" / "privacy_context.json").read_text())["private_bottom"]
    one = train_private_bottom(known.parts, layout, ids, context, seed=1, steps=2)
    again = train_private_bottom(known.parts, layout, ids, context, seed=1, steps=2)
    other = train_private_bottom(known.parts, layout, ids, context, seed=2, steps=2)
    assert len(one) == 2 and one[0].keys() == known.parts.blocks[0].state_dict().keys()
    assert all(torch.equal(one[0][k], again[0][k]) for k in one[0])
    assert not all(torch.equal(one[0][k], other[0][k]) for k in one[0])
    assert all(torch.equal(x, y) for x, y in zip(before, known.parts.blocks[0].state_dict().values()))
    with pytest.raises(ValueError, match="algorithm"):
        private_bottom.PrivateBottomSettings.from_context({"algorithm": "other", "weight": 1.0})


def _one_line(argv, capsys) -> str:
    return one_line_error(main, argv, capsys)


def test_bad_defense_flags_are_one_line_errors(sample_data, tmp_path, capsys):
    with socket.socket() as s:  # nothing listens there: the flags are refused before any call
        s.bind(("127.0.0.1", 0))
        server = f"127.0.0.1:{s.getsockname()[1]}"
    base = ["tune", "--server", server, "--insecure", "--retries", "0", "--data", sample_data]
    base += ["--out", str(tmp_path / "o")]
    cases = {
        "--label-noise": ["--label-noise", "-1"],
        "--label-noise ": ["--label-noise", "inf"],
        "--private-bottom": ["--private-bottom", "nan"],
        "--private-lr": ["--private-bottom", "1", "--private-lr", "0"],
        "--private-warmup": ["--private-warmup", "5"],
        "--private-warmup ": ["--private-warmup", "-2"],
        "--tune-client-blocks": ["--private-bottom", "1", "--tune-client-blocks"],
        "--private-bottom ": ["--private-bottom", "1", "--mode", "offsite", "--emulator", str(tmp_path)],
    }
    for flag, bad in cases.items():
        line = _one_line(base + bad, capsys)
        assert line.startswith("client tune: ") and flag.strip() in line, (flag, line)
    assert not (tmp_path / "o").exists()


def test_defense_noise_uses_every_bit_of_its_key_and_a_redone_step_redraws_the_same():
    """torch's generator keeps 32 bits of a seed (a cloud could try them all); the keyed draws keep 128. Label
    noise is keyed by the step, so a cloud that drops the session after a Backward gets the same draw again."""
    import hashlib

    import numpy as np

    from tandem.client.privacy.defenses import keyed_normal
    from tandem.client.privacy.label_defense import LabelNoise

    key = int.from_bytes(hashlib.sha256(b"k").digest()[:16], "little")
    stream = np.random.Generator(np.random.Philox(key=key)).standard_normal(6, dtype=np.float32)
    assert torch.equal(keyed_normal((6,), b"k"), torch.from_numpy(stream))
    above = np.random.Generator(np.random.Philox(key=key ^ (1 << 40))).standard_normal(6, dtype=np.float32)
    assert not np.array_equal(stream, above)
    assert torch.equal(
        torch.randn(6, generator=torch.Generator().manual_seed(5)),
        torch.randn(6, generator=torch.Generator().manual_seed(5 + 2**32)),
    )  # why not torch's

    noise, grad = LabelNoise(2.0), torch.randn(2, 3, 8)
    assert torch.equal(noise.perturb(grad, noise.draw_key(3)), noise.perturb(grad, noise.draw_key(3)))
    assert not torch.equal(noise.perturb(grad, noise.draw_key(3)), noise.perturb(grad, noise.draw_key(4)))
    assert not torch.equal(
        LabelNoise(2.0).perturb(grad, LabelNoise(2.0).draw_key(3)), noise.perturb(grad, noise.draw_key(3))
    )
    assert len(noise.secret) == 32, "256 bits of key, like the cut noise's"
    old = LabelNoise(2.0)
    old.load_state_dict({"secret": 12345})  # a checkpoint from before the 256-bit key held an int
    again = LabelNoise(2.0)
    again.load_state_dict(old.state_dict())
    assert torch.equal(old.perturb(grad, old.draw_key(3)), again.perturb(grad, again.draw_key(3)))


def test_push_refuses_an_adapter_tuned_with_a_private_bottom(tmp_path):
    """The pushed LoRA compensates for a bottom the cloud does not have: refused in one line, before any network."""
    from tandem.client.errors import ClientError
    from tandem.client.offsite import push_adapter
    from tandem.client.transport import TransportConfig

    (tmp_path / "adapter").mkdir()
    (tmp_path / PRIVATE_BOTTOM_FILE).write_bytes(b"")
    with pytest.raises(ClientError, match="private bottom"):
        push_adapter(TransportConfig(server="127.0.0.1:1", insecure=True), str(tmp_path / "adapter"))

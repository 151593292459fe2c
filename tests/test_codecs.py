"""Wire codecs: bounded reconstruction error and bytes; lossy codecs train through a real server."""

from __future__ import annotations

import pytest
import torch

from tandem.kernels import codecs
from tandem.protos import serde

# Relative L2 error bounds on Gaussian data (measured ~2e-4, 2e-3, 7e-3, 0.13).
BOUNDS = {"float32": 0.0, "float16": 1e-3, "bfloat16": 5e-3, "int8": 2e-2, "int4": 0.3}


@pytest.mark.parametrize("codec", codecs.CODECS)
@pytest.mark.parametrize("shape", [(3, 7, 33), (2, 128, 576), (1, 1, 5)])
def test_round_trip_error_is_bounded(codec, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3
    x[0, 0, 0] = 40.0  # an outlier only affects its own block
    msg = serde.encode(x, codec)
    y = serde.decode(msg, "h", codec, shape)
    err = float((y - x).norm() / x.norm())
    assert err <= BOUNDS[codec] + 1e-7, f"{codec}: relative error {err}"
    if codec == "float32":
        assert torch.equal(x, y)
    # Bytes on the wire follow the codec's size per value (protobuf framing aside).
    n = x.numel()
    payload = len(msg.data) + len(msg.scales)
    if codec in ("int8", "int4"):
        blocks = -(-n // codecs.DEFAULT_BLOCK)  # the last block is padded
        assert payload == -(-blocks * codecs.DEFAULT_BLOCK // (1 if codec == "int8" else 2)) + 4 * blocks
    else:
        assert payload == codecs.bytes_per_value(codec) * n


def test_int8_is_at_most_027x_float32_bytes():
    x = torch.randn(4, 128, 576)
    f32 = serde.encode(x, "float32").ByteSize()
    i8 = serde.encode(x, "int8").ByteSize()
    assert i8 / f32 <= 0.27


def test_decode_rejects_inconsistent_messages():
    msg = serde.encode(torch.randn(2, 3, 8), "int8")
    with pytest.raises(serde.WireError, match="negotiated codec float32"):
        serde.decode(msg, "h", "float32")
    msg.scales = msg.scales[:-4]
    with pytest.raises(serde.WireError, match="scales"):
        serde.decode(msg, "h", "int8")
    msg = serde.encode(torch.randn(2, 3, 8), "int4")
    msg.data = msg.data + b"\x00"
    with pytest.raises(serde.WireError, match="needs"):
        serde.decode(msg, "h", "int4")


@pytest.mark.parametrize("codec,lora_codec", [("bfloat16", "float32"), ("int8", "float32"), ("int8", "int8")])
def test_lossy_codec_trains_close_to_float32(codec, lora_codec, tiny_models, sample_data, server_factory):
    from tandem.client.assemble import connect_split
    from tandem.client.data import load_split
    from tandem.client.transport import Transport
    from tandem.stages.lora import LoraConfig

    server = server_factory(tiny_models["llama"])
    losses = {}
    sent = {}
    for c in ("float32", codec):
        t = Transport(server.transport_cfg(codec=c, lora_codec=lora_codec if c == codec else "float32"))
        sm = connect_split(t, LoraConfig(rank=4, alpha=8), seed=0)
        assert sm.middle.session.codec == c
        data = load_split(sample_data, sm.tokenizer, 32, 2, 0, 0.1)
        opt = torch.optim.AdamW(sm.adapter.parameters(), lr=1e-2)
        out = []
        t.meter.take_step()
        for step in range(3):
            opt.zero_grad()
            loss, _ = sm.loss(data.batch_at(step), step, 0, train=True)
            loss.backward()
            opt.step()
            out.append(float(loss.detach()))
        sent[c] = t.meter.take_step()["bytes_sent"]
        losses[c] = out
        sm.close()
        t.close()
    assert losses[codec] == pytest.approx(losses["float32"], rel=2e-2)
    assert sent[codec] < 0.75 * sent["float32"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_all_finite_finds_every_nan_and_inf(dtype):
    from tandem.kernels.checks import all_finite

    x = torch.randn(70_000, generator=torch.Generator().manual_seed(0)).to(dtype)  # over one parallel grain
    assert all_finite(x) and all_finite(x.view(700, 100).t())  # non-contiguous too
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[69_999] = bad
        assert not all_finite(y), f"{dtype}: missed {bad}"
    assert all_finite(torch.tensor([torch.finfo(dtype).max, torch.finfo(dtype).min], dtype=dtype))

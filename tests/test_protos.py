"""The committed gRPC stubs match split.proto, and tensors survive the wire bit for bit."""

from __future__ import annotations

import os

import pytest
import torch

from tandem.protos import serde
from tandem.protos.build import HERE, generate


def test_generated_stubs_are_up_to_date(tmp_path):
    for path in generate(str(tmp_path)):
        name = os.path.basename(path)
        with open(path) as a, open(os.path.join(HERE, name)) as b:
            assert a.read() == b.read(), f"{name} is stale: run `python -m tandem.protos.build` and commit"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int64])
def test_tensor_round_trip(dtype):
    t = (torch.randn(3, 5, 7) * 100).to(dtype)
    msg = serde.to_proto(t)
    back = serde.from_proto(msg, "t", dtype, (3, None, 7))
    assert back.dtype == dtype and torch.equal(back, t)
    assert len(msg.data) == t.numel() * t.element_size()  # bf16 travels as 2 bytes


def test_from_proto_rejects_bad_messages():
    msg = serde.to_proto(torch.zeros(2, 3))
    with pytest.raises(serde.WireError, match="expected dtype"):
        serde.from_proto(msg, "h", torch.float16)
    with pytest.raises(serde.WireError, match="expected shape"):
        serde.from_proto(msg, "h", shape=(2, 4))
    msg.data = msg.data[:-1]
    with pytest.raises(serde.WireError, match="needs 24 bytes"):
        serde.from_proto(msg, "h")
    msg.dtype = 99
    with pytest.raises(serde.WireError, match="unknown dtype"):
        serde.from_proto(msg, "h")


def test_a_shape_with_overflowing_dims_is_refused_before_anything_is_allocated():
    """Zero elements by product, but dimensions no message could carry: refused from the declared shape."""
    from tandem.protos import split_pb2 as pb

    with pytest.raises(serde.WireError, match="larger than any message can carry"):
        serde.decode(pb.Tensor(shape=[2**62, 2**62, 0], dtype=pb.FLOAT32), "lora")

"""Unit tests of the error-feedback kernel (tandem.kernels.feedback): the EF property, step keying, resets."""

from __future__ import annotations

import pytest
import torch

from tandem.kernels import codecs
from tandem.kernels.feedback import Feedback, Stream, rotate, unrotate


def _decoded(stream: Stream, x: torch.Tensor, step: int) -> torch.Tensor:
    values, scales = stream.encode(x, step)
    return unrotate(codecs.decode(values, scales, stream.codec, tuple(x.shape), stream.block))


def _series(n: int, shape=(3, 5, 48), seed=0) -> list[torch.Tensor]:
    """Tensors that change every step, with a few large outlier channels (as activations have)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(shape, generator=gen)
        x[..., 7] *= 40.0
        out.append(x)
    return out


@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_sum_of_what_arrived_tracks_the_sum_of_the_truth_within_one_step(codec):
    stream = Stream(codec, block=16)
    xs = _series(50)
    sent = torch.zeros_like(xs[0])
    plain = torch.zeros_like(xs[0])
    truth = torch.zeros_like(xs[0])
    bound = torch.zeros(())
    for step, x in enumerate(xs):
        sent += _decoded(stream, x, step)
        values, scales = codecs.encode(rotate(x), codec, 16)
        plain += unrotate(codecs.decode(values, scales, codec, tuple(x.shape), 16))
        truth += x
        bound = torch.maximum(bound, scales.max() / 2)  # half a quantization step of the coarsest block seen
        # The EF identity: what arrived plus what is still carried is exactly the truth (up to float rounding).
        assert torch.allclose(sent + unrotate(stream.residual), truth, atol=1e-3)
    ef_error = (sent - truth).abs().max()
    # what is carried is at most half a step of the last tensor (+ its residual); the sum's error never grows
    assert ef_error <= bound * 2 + 1e-4
    assert ef_error < 0.25 * (plain - truth).abs().max()  # without feedback the error adds up


def test_a_constant_tensor_averages_to_itself():
    x = _series(1)[0]
    stream = Stream("int4", block=16)
    total = sum(_decoded(stream, x, step) for step in range(64))
    single = unrotate(codecs.decode(*codecs.encode(rotate(x), "int4", 16), "int4", tuple(x.shape), 16))
    assert (total / 64 - x).abs().mean() < 0.1 * (single - x).abs().mean()


def test_encoding_a_step_again_sends_the_same_bytes_and_leaves_the_same_state():
    xs = _series(4)
    a, b = Stream("int4"), Stream("int4")
    for step, x in enumerate(xs):
        first = a.encode(x, step)
        again = a.encode(x, step)  # a retry, or a step redone after a lost session
        assert all(torch.equal(p, q) for p, q in zip(first, again))
        once = b.encode(x, step)
        assert all(torch.equal(p, q) for p, q in zip(first, once))
        assert torch.equal(a.residual, b.residual)


def test_a_new_shape_or_an_earlier_step_starts_from_zero():
    x = _series(1)[0]
    fresh = codecs.encode(rotate(x), "int4")
    stream = Stream("int4")
    stream.encode(_series(1, seed=3)[0], 0)
    carried = stream.encode(x, 1)
    assert not torch.equal(carried[0], fresh[0])  # the residual of step 0 was carried into step 1
    stream.encode(_series(1, shape=(2, 5, 48))[0], 2)
    assert all(torch.equal(p, q) for p, q in zip(stream.encode(x, 3), fresh))  # step 2's shape differed: no carry
    assert all(torch.equal(p, q) for p, q in zip(stream.encode(x, 0), fresh))  # backwards: restart from zero


@pytest.mark.parametrize("codec", ["float32", "float16", "bfloat16"])
def test_float_codecs_pass_through_and_get_no_encoder(codec):
    x = _series(1)[0]
    stream = Stream(codec)
    for step in range(3):
        values, scales = stream.encode(x, step)
        assert torch.equal(values, codecs.encode(x, codec)[0]) and scales is None
    assert stream.residual is None
    assert Feedback().encoder("hidden", codec, 0) is None


def test_feedback_streams_are_separate_and_evaluation_is_stateless():
    feedback = Feedback()
    x = _series(1)[0]
    for name, step in (("grad_input", -1), ("hidden", 0), ("hidden", 1)):  # evaluation, activations: rotated, no state
        assert all(
            torch.equal(p, q) for p, q in zip(feedback.encoder(name, "int4", step)(x), codecs.encode(rotate(x), "int4"))
        )
    assert not feedback.streams
    xs = _series(3)
    feedback.encoder("grad_input", "int4", 0)(xs[0])
    other = feedback.encoder("grad_output", "int4", 0)(xs[1])  # not disturbed by the other stream
    assert all(torch.equal(p, q) for p, q in zip(other, codecs.encode(rotate(xs[1]), "int4")))
    assert feedback.nbytes > 0
    feedback.reset()
    assert feedback.nbytes == 0 and not feedback.streams


def test_unknown_codec_is_refused():
    with pytest.raises(ValueError, match="unknown codec"):
        Stream("int3")


def test_rotation_is_orthonormal_and_spreads_outlier_channels():
    x = _series(1, shape=(8, 576))[0]
    x[:, [3, 150, 300, 450]] = torch.tensor([132.0, -63.0, 42.0, 28.0])  # SmolLM2's largest channels at the bottom cut
    assert torch.allclose(unrotate(rotate(x)), x, atol=1e-3)
    assert torch.allclose(rotate(x).norm(), x.norm(), rtol=1e-5)
    for codec in ("int8", "int4"):
        plain = codecs.decode(*codecs.encode(x, codec), codec, tuple(x.shape))
        turned = unrotate(codecs.decode(*codecs.encode(rotate(x), codec), codec, tuple(x.shape)))
        assert (turned - x).norm() < 0.6 * (plain - x).norm()

"""The Backbone interface: the in-process and the Ray split services implement every method it names, alike."""

from __future__ import annotations

import inspect

import pytest

from tandem.cloud.backbone import Backbone
from tandem.cloud.ray_backend import RaySplitService
from tandem.cloud.split import SplitService

IMPLEMENTATIONS = (SplitService, RaySplitService)


def protocol_methods(protocol) -> dict:
    """The methods a Protocol class declares itself (not those of typing.Protocol or object)."""
    return {
        name: value for name, value in vars(protocol).items() if inspect.isfunction(value) and not name.startswith("_")
    }


def test_the_protocol_names_what_the_split_servicer_calls():
    assert set(protocol_methods(Backbone)) == {
        "open_session",
        "close_session",
        "forward",
        "backward",
        "remote_state",
        "put_remote_state",
        "stop",
    }


@pytest.mark.parametrize("cls", IMPLEMENTATIONS, ids=lambda c: c.__name__)
def test_every_backbone_method_is_implemented_with_the_same_signature(cls):
    for name, declared in protocol_methods(Backbone).items():
        implemented = getattr(cls, name, None)
        assert callable(implemented), f"{cls.__name__} lacks {name}"
        want = inspect.signature(declared, eval_str=True)
        got = inspect.signature(implemented, eval_str=True)
        assert got == want, f"{cls.__name__}.{name}{got} differs from Backbone.{name}{want}"


def test_a_drifted_signature_is_caught():
    """The check above on a planted drift: a renamed parameter, and a missing method."""

    class Drifted(SplitService):
        def forward(self, session, step, hidden, mask, lora_version, lora, dropout_seed, train):  # lora_flat renamed
            raise NotImplementedError

    declared = inspect.signature(Backbone.forward, eval_str=True)
    assert inspect.signature(Drifted.forward, eval_str=True) != declared
    assert inspect.signature(SplitService.forward, eval_str=True) == declared


def test_a_split_service_has_every_attribute_the_servicer_reads(tiny_models):
    """The data members too, on a real (tiny) in-process service: a runtime check of the whole Protocol."""
    from typing import get_type_hints

    from tandem.stages.loading import load_model
    from tandem.stages.modules import StageLayout

    loaded = load_model(tiny_models["gpt2"])
    service = SplitService(loaded, StageLayout.parse("2:2", loaded.config))
    try:
        for name in get_type_hints(Backbone):
            assert hasattr(service, name), f"SplitService has no {name}"
    finally:
        service.stop()

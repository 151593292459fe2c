"""The client holds its stage weights once: the verified download's bytes are the tensors, with nothing copied.

It used to hold the downloaded bytes, the tensors unpacked from them and a randomly initialised model at once
(about 4x its weights). Now the shell model is built on the meta device and takes the tensors themselves, which
view the bytes read (and hashed) from the cache. The safetensors header is parsed by tandem here, so every claim
in it is checked: the stages come from the server. Memory is measured in bench/scale.py, not asserted here.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from tandem.stages.arch import parts_of
from tandem.stages.errors import ModelLoadError
from tandem.stages.loading import build_client_model, client_state, load_model, pack_state, shell_config
from tandem.stages.modules import StageLayout
from tandem.stages.precision import Placement
from tandem.stages.tensor_views import tensor_views
from tandem.testing.servers import start_server
from tandem.testing.split_runs import connect_via


def _craft(entries: list[tuple[str, str, list[int], bytes]], pad: int = 0, extra: bytes = b"") -> bytearray:
    """A safetensors file laid out in the order given (no alignment), `extra` bytes after the data."""
    header, offset = {}, 0
    for name, dtype, shape, data in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    text = json.dumps(header).encode() + b" " * pad
    return bytearray(len(text).to_bytes(8, "little") + text + b"".join(e[3] for e in entries) + extra)


def _same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert torch.equal(got[k], want[k]), k


def _views(tensor: torch.Tensor, data: bytearray) -> bool:
    base = torch.frombuffer(data, dtype=torch.uint8).data_ptr()
    return base <= tensor.data_ptr() < base + len(data)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_views_are_safetensors_values_without_a_copy(tiny_models, arch, dtype):
    loaded = load_model(tiny_models[arch], "cpu", dtype)
    blob = pack_state(client_state(parts_of(loaded.model), StageLayout.parse("2:1", loaded.config)))
    data = bytearray(blob)
    views = tensor_views(data)
    _same(views, st_load(blob))
    assert all(_views(v, data) for v in views.values()), "a tensor was copied"


def test_unaligned_and_odd_tensors_read_as_safetensors_reads_them():
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "odd_bytes": torch.randint(0, 255, (3,), dtype=torch.uint8, generator=generator),
        "bf16": torch.randn(5, generator=generator).to(torch.bfloat16),
        "f32": torch.randn(2, 3, generator=generator),
        "i64": torch.tensor([-(1 << 62), 7]),
        "flags": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 4, dtype=torch.float16),
    }
    entries = [(k, {torch.uint8: "U8", torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64",
                    torch.bool: "BOOL", torch.float64: "F64", torch.float16: "F16"}[v.dtype], list(v.shape),
                v.contiguous().view(torch.uint8).numpy().tobytes() if v.dim() else v.reshape(1).view(torch.uint8).numpy().tobytes())
               for k, v in tensors.items()]  # fmt: skip
    data = _craft(entries)
    views = tensor_views(data)
    _same(views, tensors)
    _same(views, st_load(bytes(data)))
    assert not _views(views["f32"], data), "an unaligned float32 is copied to aligned memory"
    assert _views(views["odd_bytes"], data)
    packed = bytearray(st_save(tensors))  # safetensors' own layout: aligned, nothing copied
    assert all(_views(v, packed) for v in tensor_views(packed).values() if v.numel())


F32 = torch.ones(2).numpy().tobytes()  # 8 bytes


@pytest.mark.parametrize(
    "data, says",
    [
        (bytearray(b"\x05\x00"), "shorter than its 8-byte header length"),
        (bytearray((1 << 40).to_bytes(8, "little") + b"{}"), "a header of 1099511627776 bytes"),
        (bytearray((4).to_bytes(8, "little") + b"{x:1"), "not JSON"),
        (bytearray((2).to_bytes(8, "little") + b"[]"), "not a JSON object"),
        (_craft([("w", "F8_E4M3", [8], F32)]), "dtype 'F8_E4M3'"),
        (_craft([("w", "F32", [-2], F32)]), "shape"),
        (_craft([("w", "F32", [True, 2], F32)]), "shape"),
        (_craft([("w", "F32", [3], F32)]), "8 bytes for a F32 [3] (12)"),
        (_craft([("w", "F32", [2], F32)], extra=b"\x00"), "cover 8 of the 9 bytes"),
        (_craft([("w", "BOOL", [2], b"\x01\x02")]), "other than 0 or 1"),
        (_craft([("w", "F32", [0, 1 << 40], b"")]), "shape"),
    ],
)
def test_a_hostile_header_is_refused_in_one_line(data, says):
    with pytest.raises(ModelLoadError, match="not a safetensors file we accept") as ei:
        tensor_views(data)
    assert says in str(ei.value) and "\n" not in str(ei.value)


def _with_header(header: dict, data: bytes) -> bytearray:
    text = json.dumps(header).encode()
    return bytearray(len(text).to_bytes(8, "little") + text + data)


@pytest.mark.parametrize(
    "offsets, says",
    [
        ([[0, 8], [4, 12]], "begins at byte 4 of the data, not at 8"),  # overlap
        ([[0, 8], [12, 20]], "begins at byte 12 of the data, not at 8"),  # gap
        ([[0, 8], [8, 16], [16, 24]], "cover 24 of the 16 bytes"),  # past the data
        ([[8, 0], [8, 16]], "data offsets"),
    ],
)
def test_offsets_must_tile_the_data(offsets, says):
    header = {f"w{i}": {"dtype": "F32", "shape": [2], "data_offsets": o} for i, o in enumerate(offsets)}
    with pytest.raises(ModelLoadError, match="not a safetensors file we accept") as ei:
        tensor_views(_with_header(header, F32 * 2))
    assert says in str(ei.value)


def _random_init_build(config, layout, state, placement):
    """How the client built its stages before: a randomly initialised model, then the weights copied in."""
    from transformers import AutoModelForCausalLM

    cfg = shell_config(config, layout)
    model = AutoModelForCausalLM.from_config(cfg, dtype=placement.dtype)
    model.load_state_dict(state, strict=False)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("served, placed", [("float32", torch.float32), ("bfloat16", torch.bfloat16),
                                            ("bfloat16", torch.float32), ("float32", torch.bfloat16)])  # fmt: skip
def test_the_shell_model_takes_the_weights_bit_for_bit(tiny_models, arch, served, placed):
    loaded = load_model(tiny_models[arch], "cpu", served)
    layout = StageLayout.parse("2:1", loaded.config)
    blob = pack_state(client_state(parts_of(loaded.model), layout))
    placement = Placement(torch.device("cpu"), placed)
    data = bytearray(blob)
    model = build_client_model(loaded.config, layout, tensor_views(data), placement)
    before = _random_init_build(loaded.config, layout, st_load(blob), placement)
    _same(model.state_dict(), before.state_dict())
    _same(dict(model.named_buffers()), dict(before.named_buffers()))
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    assert torch.equal(model(ids).logits, before(ids).logits)
    viewing = [_views(p, data) for p in model.parameters()]
    assert all(viewing) if served == str(placed).removeprefix("torch.") else not any(viewing)
    if loaded.config.tie_word_embeddings:
        assert model.lm_head.weight is model.get_input_embeddings().weight


def test_weights_that_do_not_fit_are_refused(tiny_models):
    loaded = load_model(tiny_models["llama"])
    layout = StageLayout.parse("2:1", loaded.config)
    state = client_state(parts_of(loaded.model), layout)
    key = next(k for k in state if k.endswith("q_proj.weight"))
    with pytest.raises(ModelLoadError, match=r"do not fit the model: .*q_proj.weight \[32, 31\] \(needs \[32, 32\]\)"):
        build_client_model(loaded.config, layout, {**state, key: state[key][:, :31]})
    with pytest.raises(ModelLoadError, match="missing"):
        build_client_model(loaded.config, layout, {k: v for k, v in state.items() if k != key})


def test_the_cached_stages_rewritten_in_place_change_nothing_already_loaded(tiny_models, tmp_path, monkeypatch):
    """The tensors are the bytes that were hashed, in this process's memory: not a mapping of the cache file,
    which whoever can write the cache could change after the check. The altered cache is downloaded again."""
    monkeypatch.setenv("TANDEM_CACHE", str(tmp_path / "cache"))
    server = start_server(tiny_models["llama"], tmp_path, "--client-blocks", "2:2")
    try:
        model = connect_via(server.addr, server)
        weights = {k: v.clone() for k, v in model.bottom.parts.embed.state_dict().items()}
        path = tmp_path / "cache" / "client" / model.stages_sha256 / "client_stages.safetensors"
        size = os.path.getsize(path)
        with open(path, "r+b") as f:  # in place: the same inode, the same size
            f.write(bytes(size))
        _same(model.bottom.parts.embed.state_dict(), weights)
        again = connect_via(server.addr, server)
        _same(again.bottom.parts.embed.state_dict(), weights)
        assert path.read_bytes() != bytes(size), "the altered cache was downloaded again"
    finally:
        server.stop()

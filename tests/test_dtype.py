"""The exactness contract per dtype: float32 is bit-exact (tests/test_exactness.py); bfloat16 and float16 split
(a real `cloud serve --dtype` process, TLS) agree with local mode in the same dtype within a stated tolerance."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

from tandem.client.assemble import build_local, connect_split
from tandem.client.cli import main as client_main
from tandem.client.data import load_split
from tandem.client.transport import Transport
from tandem.stages.lora import LoraConfig
from tandem.stages.precision import PlacementError, resolve
from tandem.testing.cli_errors import one_line_error
from tandem.testing.models import ARCHS
from tandem.testing.servers import BIN

# Split vs local in the same half dtype on the same device, over 3 AdamW steps with LoRA dropout and padding:
# the largest relative gap of the loss, and of any LoRA gradient.
# Measured on this CPU (torch 2.13, tiny Llama, Qwen2 and GPT-2): 0 and 0 in bfloat16 and in float16, with the float32
# codec and with the bfloat16 one. The wire carries the half-precision cut values exactly (a float32 codec is an
# exact upcast, and each side casts what arrives back exactly), so both modes run the same kernels on the same values.
# The bounds below leave float32-level room (a kernel may sum in another order for a leaf input than for a graph
# input) yet fail what a real mistake gives: a cloud computing in float32 under a bfloat16 client measured loss gaps
# of 3e-5..1.3e-4 and gradient gaps of 0.10..0.20; an int8 wire 4e-5..3e-4 and 0.28..0.31.
LOSS_REL = 1e-5
GRAD_REL = 1e-3
# On CUDA the half-precision backward kernels may use atomics (run to run differences), so the GPU test allows the
# half dtype's own rounding (bfloat16: 2**-8); not measured here (no GPU on this machine).
CUDA_LOSS_REL, CUDA_GRAD_REL = 4e-3, 5e-2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _run_pair(split, local, data, steps: int = 3):
    """Trains both models on the same batches; returns the largest relative loss and gradient gaps."""
    opts = [torch.optim.AdamW(m.adapter.parameters(), lr=5e-2) for m in (split, local)]
    loss_gap, grad_gap, losses_seen = 0.0, 0.0, []
    for step in range(steps):
        batch = data.batch_at(step)
        if step == 1:  # right padding inside a batch
            batch["attention_mask"][-1, 15:] = 0
            batch["labels"][-1, 15:] = -100
        losses, grads = [], []
        for m, opt in zip((split, local), opts):
            opt.zero_grad()
            loss, _ = m.loss(batch, step, seed=3, train=True)
            loss.backward()
            losses.append(float(loss.detach()))
            grads.append([p.grad.clone() for p in m.adapter.parameters()])
            opt.step()
        losses_seen.append(losses[1])
        loss_gap = max(loss_gap, abs(losses[0] - losses[1]) / abs(losses[1]))
        for gs, gl in zip(*grads):
            assert gs.dtype == torch.float32 and gl.dtype == torch.float32, "LoRA masters stay float32"
            if gl.norm() > 0:
                grad_gap = max(grad_gap, _rel(gs, gl))
    return loss_gap, grad_gap, losses_seen


def _split_and_local(arch, dtype: str, tiny_models, server_factory, codec: str = "float32", *flags: str):
    server = server_factory(tiny_models[arch], "--dtype", dtype, "--device", "cpu", *flags)
    assert f"computing in {dtype} on cpu" in server.log()
    lora = LoraConfig(rank=4, alpha=8, dropout=0.1)
    transport = Transport(server.transport_cfg(codec=codec))
    split = connect_split(transport, lora, seed=3, device="cpu", dtype=dtype)
    local = build_local(tiny_models[arch], "2:2", lora, seed=3, device="cpu", dtype=dtype)
    return transport, split, local


@pytest.mark.parametrize("arch", ARCHS)
def test_bfloat16_split_matches_local(arch, tiny_models, sample_data, server_factory):
    transport, split, local = _split_and_local(arch, "bfloat16", tiny_models, server_factory)
    try:
        for model in (split, local):  # frozen weights compute in bfloat16, the adapter stays float32
            assert model.bottom.parts.embed.weight.dtype == torch.bfloat16
            assert all(p.dtype == torch.float32 for p in model.adapter.parameters())
        for a, b in zip(split.adapter.parameters(), local.adapter.parameters()):
            assert torch.equal(a, b)
        data = load_split(sample_data, split.tokenizer, seq_len=24, batch_size=3, seed=3, val_fraction=0.1)
        loss_gap, grad_gap, losses = _run_pair(split, local, data)
        print(f"bfloat16 {arch}: loss gap {loss_gap:.3g}, LoRA grad gap {grad_gap:.3g}")
        assert loss_gap <= LOSS_REL and grad_gap <= GRAD_REL, (loss_gap, grad_gap)
        # It really ran in bfloat16: float32 local mode gives another first loss.
        ref = build_local(tiny_models[arch], "2:2", LoraConfig(rank=4, alpha=8, dropout=0.1), seed=3, dtype="float32")
        first, _ = ref.loss(data.batch_at(0), 0, seed=3, train=True)
        assert float(first.detach()) != losses[0]
    finally:
        split.close()
        transport.close()


def test_float16_split_matches_local(tiny_models, sample_data, server_factory):
    transport, split, local = _split_and_local("llama", "float16", tiny_models, server_factory)
    try:
        assert split.bottom.parts.embed.weight.dtype == torch.float16
        data = load_split(sample_data, split.tokenizer, seq_len=24, batch_size=3, seed=3, val_fraction=0.1)
        loss_gap, grad_gap, _ = _run_pair(split, local, data)
        print(f"float16 llama: loss gap {loss_gap:.3g}, LoRA grad gap {grad_gap:.3g}")
        assert loss_gap <= LOSS_REL and grad_gap <= GRAD_REL, (loss_gap, grad_gap)
    finally:
        split.close()
        transport.close()


def test_bfloat16_recompute_mode_matches_local(tiny_models, sample_data, server_factory):
    """Recompute mode (the cloud keeps the middle's input, in the compute dtype, and reruns the forward) in bfloat16."""
    flags = ("--forward-state", "recompute")
    transport, split, local = _split_and_local("qwen2", "bfloat16", tiny_models, server_factory, "float32", *flags)
    try:
        data = load_split(sample_data, split.tokenizer, seq_len=24, batch_size=3, seed=3, val_fraction=0.1)
        loss_gap, grad_gap, _ = _run_pair(split, local, data)
        print(f"bfloat16 qwen2 recompute: loss gap {loss_gap:.3g}, LoRA grad gap {grad_gap:.3g}")
        assert loss_gap <= LOSS_REL and grad_gap <= GRAD_REL, (loss_gap, grad_gap)
    finally:
        split.close()
        transport.close()


def test_generate_on_a_bfloat16_server_is_the_models_own_greedy_decoding(tiny_models, server_factory):
    """Adapter serving (batched decoding over the shared model) in bfloat16: the base model's tokens are those of
    Hugging Face's generate on the same bfloat16 weights."""
    from tandem.client.serving import generate
    from tandem.stages.loading import load_model, load_tokenizer

    model_dir = tiny_models["llama"]
    server = server_factory(model_dir, "--dtype", "bfloat16", "--device", "cpu")
    got = generate(server.transport_cfg(), ["the quick brown fox"], "", 6)["completions"][0]["token_ids"]
    model = load_model(model_dir, "cpu", "bfloat16").model
    prompt = load_tokenizer(model_dir)("the quick brown fox")["input_ids"]
    eos = {model.generation_config.eos_token_id}
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=6,
        do_sample=False,
        eos_token_id=sorted(eos),
        pad_token_id=min(eos),
    )
    want = out[0, len(prompt) :].tolist()
    want = want[: next((i for i, t in enumerate(want) if t in eos), len(want))]
    assert got == want


def test_the_wire_codec_is_independent_of_the_compute_dtype(tiny_models, sample_data, server_factory):
    """bfloat16 compute with a bfloat16 wire codec: the cut values are bfloat16 already, so nothing is lost;
    a float32 client against a bfloat16 cloud casts what arrives (and trains)."""
    transport, split, local = _split_and_local("gpt2", "bfloat16", tiny_models, server_factory, codec="bfloat16")
    try:
        data = load_split(sample_data, split.tokenizer, seq_len=24, batch_size=3, seed=3, val_fraction=0.1)
        loss_gap, grad_gap, _ = _run_pair(split, local, data, steps=2)
        assert loss_gap <= LOSS_REL and grad_gap <= GRAD_REL, (loss_gap, grad_gap)
    finally:
        split.close()
    mixed = connect_split(transport, LoraConfig(rank=4, alpha=8), seed=3, device="cpu", dtype="float32")
    try:
        assert mixed.bottom.parts.embed.weight.dtype == torch.float32
        loss, _ = mixed.loss(data.batch_at(0), 0, seed=3, train=True)
        loss.backward()
        assert torch.isfinite(loss) and loss.dtype == torch.float32
    finally:
        mixed.close()
        transport.close()


def test_weights_load_directly_in_the_dtype(tiny_models):
    from tandem.stages.loading import load_model

    loaded = load_model(tiny_models["qwen2"], device="cpu", dtype="bfloat16")
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert str(loaded.placement) == "bfloat16 on cpu"
    auto = load_model(tiny_models["qwen2"], device="cpu", dtype="auto")  # auto on a CPU: float32
    assert {p.dtype for p in auto.model.parameters()} == {torch.float32}


def test_auto_reads_the_checkpoint_dtype_on_a_gpu_only():
    from transformers import LlamaConfig

    config = LlamaConfig(dtype="bfloat16")
    assert resolve("cpu", "auto", config).dtype == torch.float32
    assert resolve("cpu", "float16", config).dtype == torch.float16
    if torch.cuda.is_available():
        assert resolve("cuda", "auto", config).dtype == torch.bfloat16
    for device, dtype in (("tpu", "auto"), ("cuda:x", "auto"), ("cpu", "float64"), ("cpu", "int8")):
        with pytest.raises(PlacementError):
            resolve(device, dtype)


def _one_line(cmd) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize(
    "flag, value, words",
    [
        ("--dtype", "float64", "expected one of auto, float32, bfloat16, float16"),
        ("--device", "tpu", "expected auto, cpu, cuda or cuda:N"),
        ("--device", "cuda", "no usable CUDA device"),
        ("--device", "cuda:7", "CUDA device"),
    ],
)
def test_cloud_serve_bad_device_or_dtype_is_one_line(tiny_models, flag, value, words):
    if value.startswith("cuda") and torch.cuda.is_available() and (value == "cuda" or torch.cuda.device_count() > 7):
        pytest.skip("this machine has that CUDA device")
    cmd = [os.path.join(BIN, "cloud"), "serve", "--model", tiny_models["gpt2"], "--insecure", "--listen", "127.0.0.1:0"]
    line = _one_line(cmd + [flag, value])
    assert line.startswith("cloud serve: ") and flag in line and words in line, line


@pytest.mark.parametrize("flag, value", [("--dtype", "half"), ("--device", "gpu")])
def test_client_tune_bad_device_or_dtype_is_one_line(sample_data, tmp_path, capsys, flag, value):
    argv = ["tune", "--data", sample_data, "--out", str(tmp_path / "run"), "--server", "127.0.0.1:9", flag, value]
    line = one_line_error(client_main, argv, capsys)
    assert flag in line and value in line, line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_client_tune_on_cuda_without_cuda_is_one_line_before_the_network(tiny_models, sample_data, tmp_path):
    cmd = [os.path.join(BIN, "client"), "tune", "--data", sample_data, "--out", str(tmp_path / "run")]
    cmd += ["--server", "127.0.0.1:9", "--retries", "0", "--insecure", "--device", "cuda"]
    line = _one_line(cmd)
    assert line.startswith("client tune: --device cuda") and "no usable CUDA device" in line, line


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ARCHS)
def test_bfloat16_on_cuda_split_matches_local(arch, tiny_models, sample_data, server_factory):
    server = server_factory(tiny_models[arch], "--dtype", "bfloat16", "--device", "cuda")
    assert "computing in bfloat16 on cuda" in server.log()
    lora = LoraConfig(rank=4, alpha=8, dropout=0.1)
    transport = Transport(server.transport_cfg())
    split = connect_split(transport, lora, seed=3, device="cuda", dtype="bfloat16")
    local = build_local(tiny_models[arch], "2:2", lora, seed=3, device="cuda", dtype="bfloat16")
    try:
        assert split.bottom.parts.embed.weight.is_cuda and all(p.is_cuda for p in split.adapter.parameters())
        data = load_split(sample_data, split.tokenizer, seq_len=24, batch_size=3, seed=3, val_fraction=0.1)
        loss_gap, grad_gap, _ = _run_pair(split, local, data)
        print(f"bfloat16 cuda {arch}: loss gap {loss_gap:.3g}, LoRA grad gap {grad_gap:.3g}")
        assert loss_gap <= CUDA_LOSS_REL and grad_gap <= CUDA_GRAD_REL, (loss_gap, grad_gap)
    finally:
        split.close()
        transport.close()


def test_bfloat16_batched_sessions_match_each_alone(tiny_models):
    """The cloud's batched pass (MultiBinding, one pass for many sessions) in bfloat16: each session gets what it
    gets alone. Measured gap: 0 (outputs, input gradients and LoRA gradients, with dropout and a padded row); the
    bound leaves room for a kernel that sums a padded row in another order, far below a wrong dtype's 0.1."""
    import threading

    from tandem.cloud.batching import BatchingConfig
    from tandem.cloud.split import SplitService
    from tandem.stages.loading import load_model
    from tandem.stages.lora import flatten, slot_shapes
    from tandem.stages.modules import StageLayout

    loaded = [load_model(tiny_models["llama"], "cpu", "bfloat16") for _ in range(2)]
    layout = StageLayout.parse("2:2", loaded[0].config)
    alone = SplitService(loaded[0], layout, serve_client_files=False)
    batching = BatchingConfig(window_ms=500, backward_wait_ms=10_000)
    batched = SplitService(loaded[1], layout, serve_client_files=False, batching=batching)
    gen = torch.Generator().manual_seed(0)
    lora = LoraConfig(rank=4, alpha=8, dropout=0.1)
    runs = []
    for b, t in ((2, 16), (1, 24)):
        sessions = [svc.open_session("alice", "", lora, True) for svc in (alone, batched)]
        flat = flatten([torch.randn(s, generator=gen) * 0.1 for s in slot_shapes(sessions[0].slots, lora.rank)])
        h = torch.randn(b, t, alone.hidden_size, generator=gen)
        mask = torch.ones(b, t, dtype=torch.uint8)
        runs.append((sessions, flat, h, mask, torch.randn(b, t, alone.hidden_size, generator=gen)))

    def step(svc, session, flat, h, mask, grad):
        out, _ = svc.forward(session, 0, h, mask, 1, flat, 7, True)
        grad_in, lora_grad, _ = svc.backward(session, 0, grad)
        return out.float(), grad_in.float(), lora_grad

    want = [step(alone, sessions[0], *rest) for sessions, *rest in runs]
    got = [None] * len(runs)

    def run(i: int) -> None:
        sessions, *rest = runs[i]
        got[i] = step(batched, sessions[1], *rest)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(runs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert batched.batcher.batches >= 1, "the two sessions never shared a pass"
    for w, g in zip(want, got):
        assert w[0].dtype == torch.float32 and w[2].dtype == torch.float32
        gaps = [_rel(a, b) for a, b in zip(g, w)]
        print(f"bfloat16 batched vs alone: out, grad in, LoRA grad gaps {gaps}")
        assert max(gaps) <= GRAD_REL, gaps
    alone.stop()
    batched.stop()


def test_client_tune_local_in_bfloat16_and_a_resume_in_another_dtype_is_refused(tiny_models, sample_data, tmp_path):
    """`client tune --mode local --dtype bfloat16` end to end (report, adapter in float32); resuming its checkpoint in
    float32 would change the steps, so it is one line naming the dtype."""
    from safetensors.torch import load_file

    out = str(tmp_path / "run")
    cmd = [os.path.join(BIN, "client"), "tune", "--mode", "local", "--model", tiny_models["gpt2"], "--data"]
    cmd += [sample_data, "--out", out, "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--no-progress"]
    cmd += ["--checkpoint-every", "1", "--device", "cpu"]
    r = subprocess.run(cmd + ["--dtype", "bfloat16"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    saved = load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))
    assert saved and all(t.dtype == torch.float32 for t in saved.values())
    cmd[cmd.index("--steps") + 1] = "3"
    r = subprocess.run(cmd + ["--dtype", "float32", "--resume"], capture_output=True, text=True, timeout=300)
    last = r.stderr.strip().splitlines()[-1]  # after the model's loading progress
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert last.startswith("client tune: --resume") and "compute dtype (--dtype) bfloat16 (now float32)" in last, last


def test_pipeline_shards_in_bfloat16_chain_exactly_like_one_service(tiny_models):
    """Ray's shard actors (the plain class, without Ray): they load in the door's resolved dtype, pass float32 on
    the CPU between them (an exact upcast of their bfloat16 output), and together equal one service."""
    from tandem.cloud.limits import ServiceLimits
    from tandem.cloud.ray_shard import MiddleShard, shard_config, shard_ranges
    from tandem.cloud.sessions import StoreConfig
    from tandem.cloud.split import SplitService
    from tandem.stages.loading import load_model
    from tandem.stages.lora import config_dict, flatten, slot_shapes
    from tandem.stages.modules import StageLayout

    loaded = load_model(tiny_models["llama"], "cpu", "bfloat16")
    layout = StageLayout.parse("2:2", loaded.config)
    config = shard_config(loaded, layout, StoreConfig(), ServiceLimits(), None)
    assert config["dtype"] == "bfloat16" and config["device"] == "cpu"
    shards = [MiddleShard(blocks=blocks, **config) for blocks in shard_ranges(layout.middle_blocks, 2)]
    whole = SplitService(loaded, layout, serve_client_files=False)
    lora = LoraConfig(rank=4, alpha=8)
    session = whole.open_session("alice", "", lora, True)
    for shard in shards:
        shard.open("alice", "", config_dict(lora), True, "float32", "float32", session.id)
    gen = torch.Generator().manual_seed(0)
    lora_values = [torch.randn(shape, generator=gen) * 0.1 for shape in slot_shapes(session.slots, lora.rank)]
    h = torch.randn(2, 12, whole.hidden_size, generator=gen)
    mask = torch.ones(2, 12, dtype=torch.uint8)
    grad = torch.randn(2, 12, whole.hidden_size, generator=gen)

    out, _ = whole.forward(session, 0, h, mask, 1, flatten(lora_values), 0, True)
    grad_in, lora_grad, _ = whole.backward(session, 0, grad)
    chained, at = h, 0
    for shard in shards:
        n = len(shard.service.store.get(session.id, "alice").slots)
        flat = flatten(lora_values[2 * at : 2 * (at + n)])
        chained, _ = shard.forward("alice", session.id, 0, chained, mask, 1, flat, 0, True)
        assert chained.dtype == torch.float32 and chained.device.type == "cpu"
        at += n
    back, grads = grad, []
    for shard in reversed(shards):
        back, flat, _ = shard.backward("alice", session.id, 0, back)
        grads.insert(0, flat)
    assert torch.equal(chained, out.float()) and torch.equal(back, grad_in.float())
    assert torch.equal(torch.cat(grads), lora_grad)


def test_tuning_whole_client_blocks_in_a_half_dtype_is_refused(tiny_models, sample_data, tmp_path):
    from tandem.client.errors import ClientError

    model = build_local(tiny_models["gpt2"], "2:2", LoraConfig(rank=4, alpha=8), seed=0, device="cpu", dtype="bfloat16")
    with pytest.raises(ClientError, match="--tune-client-blocks.*bfloat16.*--dtype float32"):
        model.unfreeze_client_blocks()

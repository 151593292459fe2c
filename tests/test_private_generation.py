"""Private generation (`client generate --private`): the adapter's own LoRA stays with the data owner, the cloud keeps
the middle's KV cache, and the tokens equal local generation with the adapter merged into the whole model."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tandem.client.cli import main
from tandem.client.errors import ClientError, ServerError
from tandem.client.private_generation import generate_private
from tandem.client.session import open_session
from tandem.client.transport import Transport
from tandem.cloud.decode import DecodeJob, decode
from tandem.cloud.tls import issue_bundle
from tandem.protos import serde
from tandem.protos import split_pb2 as pb
from tandem.stages.arch import arch_for, parts_of
from tandem.stages.loading import load_model, load_tokenizer
from tandem.stages.lora import LoRAAdapter, LoraConfig, PeftMeta, inject_slots, load_peft_tensors, save_peft
from tandem.testing.models import ARCHS
from tandem.testing.proxies import Hop

PROMPTS = ["the quick brown fox", "split learning keeps labels", "low"]
NEW = 6
HIDDEN = 32  # tandem.testing.models: the tiny models' hidden size


def make_adapter(model_dir: str, out: str, seed: int, rank: int = 4, blocks: list[int] | None = None) -> str:
    """A peft adapter on `blocks` (default every block: bottom, middle and top) with random A and non-zero B, as
    `client tune` saves one."""
    loaded = load_model(model_dir)
    parts = parts_of(loaded.model)
    blocks = blocks if blocks is not None else list(range(len(parts.blocks)))
    chosen = torch.nn.ModuleList(parts.blocks[i] for i in blocks)
    specs = inject_slots(chosen, parts.arch, blocks, parts.arch.lora_targets)
    g = torch.Generator().manual_seed(seed)
    adapter = LoRAAdapter(specs, LoraConfig(rank=rank, alpha=2.0 * rank), generator=g)
    with torch.no_grad():
        for b in adapter.b:
            b.copy_(torch.randn(b.shape, generator=g) * 0.5)
    save_peft(adapter, out, PeftMeta(loaded.model_id, fan_in_fan_out=arch_for(loaded.config).fan_in_fan_out))
    return out


def merged_generation(model_dir: str, adapter_dir: str | None, temperature: float = 0.0, seed: int = 0):
    """Local generation with the adapter merged into the whole Hugging Face model (W + alpha / r B A), decoded as
    the server path decodes (cloud/decode.py: the same padding, positions and sampling)."""
    loaded = load_model(model_dir)
    model = loaded.model
    if adapter_dir is not None:
        cfg, tensors = load_peft_tensors(adapter_dir)
        modules = dict(model.named_modules())
        with torch.no_grad():
            for key, a in tensors.items():
                if key.endswith(".lora_A.weight"):
                    path = key.removesuffix(".lora_A.weight")
                    delta = cfg["lora_alpha"] / cfg["r"] * (tensors[f"{path}.lora_B.weight"] @ a)  # (out, in)
                    layer = modules[path]
                    layer.weight += delta.T if type(layer).__name__ == "Conv1D" else delta
    tokenizer = load_tokenizer(model_dir)
    eos = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    eos |= {int(loaded.config.eos_token_id)} if isinstance(loaded.config.eos_token_id, int) else set()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    job = DecodeJob(None, ids, NEW, temperature, seed)
    return [toks for toks, _ in decode(model, [job], pad, eos)[0]]


@pytest.fixture(scope="module")
def servers(tiny_models, tmp_path_factory):
    from tandem.testing.servers import start_server

    started = {
        arch: start_server(tiny_models[arch], tmp_path_factory.mktemp(f"pg-{arch}"), "--max-cache-tokens", "256")
        for arch in ARCHS
    }
    yield started
    for server in started.values():
        server.stop()


@pytest.mark.parametrize("arch", ARCHS)
def test_private_generation_equals_the_merged_model(arch, servers, tiny_models, tmp_path):
    """Greedy and seeded sampling, three prompts of different lengths in one batch: token for token."""
    model_dir = tiny_models[arch]
    adapter = make_adapter(model_dir, str(tmp_path / "adapter"), seed=3)
    server = servers[arch]
    greedy = generate_private(server.transport_cfg(), PROMPTS, adapter, NEW)
    assert [c["token_ids"] for c in greedy["completions"]] == merged_generation(model_dir, adapter)
    assert [c["token_ids"] for c in greedy["completions"]] != merged_generation(model_dir, None), "adapter matters"
    sampled = generate_private(server.transport_cfg(), PROMPTS, adapter, NEW, temperature=1.5, seed=11)
    assert [c["token_ids"] for c in sampled["completions"]] == merged_generation(model_dir, adapter, 1.5, 11)
    # Prefill in one Forward, then one per new token (none after the last); bytes counted per token.
    assert greedy["forwards"] == NEW and greedy["batch_sequences"] == len(PROMPTS)
    assert greedy["bytes_per_token"] > 0 and greedy["tokens_per_s"] > 0


def test_the_cloud_never_receives_the_clients_own_lora(servers, tiny_models, tmp_path):
    """Every message through a recording hop (unsealed, so the bytes are plain): no bottom or top LoRA tensor's
    bytes appear anywhere; the middle's appear in exactly one request."""
    server = servers["llama"]
    adapter = make_adapter(tiny_models["llama"], str(tmp_path / "adapter"), seed=5)
    hop = Hop(server)
    try:
        generate_private(hop.transport_cfg(seal=False), PROMPTS, adapter, NEW)
    finally:
        hop.close()
    sent = [request.SerializeToString() for _, request in hop.seen]
    assert sum(1 for name, _ in hop.seen if name == "Forward") == NEW
    _, tensors = load_peft_tensors(adapter)
    middle = [f"model.layers.{i}." for i in (2, 3)]  # `cloud serve`'s default cut 2:2 of six blocks
    for key, tensor in tensors.items():
        needle = tensor.float().numpy().tobytes()
        hits = sum(message.count(needle) for message in sent)
        assert hits == (1 if any(key.startswith(m) for m in middle) else 0), key


def _stub_session(server, **kw):
    transport = Transport(server.transport_cfg(seal=False, **kw))
    return transport, open_session(transport, LoraConfig(rank=4, alpha=8), remote_lora=False, generation=True)


def _forward(transport, session, batch: int, new: int, past: int, step: int = 0, train: bool = False):
    req = pb.ForwardRequest(
        session_id=session.id,
        step=step,
        hidden=serde.to_proto(torch.randn(batch, new, HIDDEN)),
        attention_mask=serde.to_proto(torch.ones(batch, past + new, dtype=torch.uint8)),
        past_length=past,
        train=train,
    )
    return transport.call("Forward", req, retry=False)


def test_generation_session_refusals(servers):
    """past_length mismatch, cache cap, batch change, Backward, train=true: one clear error each; the cache goes on."""
    server = servers["llama"]
    transport, session = _stub_session(server)
    assert session.info.generation and session.info.max_cache_tokens == 256
    try:
        _forward(transport, session, 2, 5, 0)
        with pytest.raises(ServerError, match=r"past_length 7 is more than the 5 positions .* send past_length=5"):
            _forward(transport, session, 2, 1, 7)
        with pytest.raises(ServerError, match=r"batch size changed from 2 to 3"):
            _forward(transport, session, 3, 1, 5)
        with pytest.raises(ServerError, match=r"2 x 130 positions, over the server's cap of 256 per session"):
            _forward(transport, session, 2, 125, 5)
        with pytest.raises(ServerError, match=r"train=true in a generation session"):
            _forward(transport, session, 2, 1, 5, train=True)
        backward = pb.BackwardRequest(
            session_id=session.id, step=0, grad_output=serde.to_proto(torch.ones(2, 1, HIDDEN))
        )
        with pytest.raises(ServerError, match=r"this is a generation session: .* runs no Backward"):
            transport.call("Backward", backward, retry=False)
        out = _forward(transport, session, 2, 1, 5)  # refusals left the cache as it was
        assert list(out.hidden.shape) == [2, 1, HIDDEN]
        bob = Transport(server.transport_cfg(seal=False, identity=issue_bundle(server.tls_dir, "bob-pg")))
        with pytest.raises(ServerError, match="belongs to another identity"):
            _forward(bob, session, 2, 1, 6)
        bob.close()
        _forward(transport, session, 1, 4, 0)  # past_length 0 starts over, with any batch
    finally:
        transport.call("CloseSession", pb.CloseSessionRequest(session_id=session.id), retry=False)
        transport.close()
    with pytest.raises(ServerError, match="past_length is for generation sessions"):
        tuning = Transport(server.transport_cfg(seal=False))
        plain = open_session(tuning, LoraConfig(rank=4, alpha=8), remote_lora=False)
        _forward(tuning, plain, 1, 2, 2)


def test_client_refuses_what_does_not_fit_the_cap(servers, tiny_models, tmp_path):
    adapter = make_adapter(tiny_models["llama"], str(tmp_path / "adapter"), seed=1)
    with pytest.raises(ClientError, match=r"over the server's cap of 256 per session; use fewer prompts"):
        generate_private(servers["llama"].transport_cfg(), PROMPTS, adapter, 100)


def test_cli_records_what_the_cloud_received_and_audits_it(servers, tiny_models, tmp_path, capsys):
    server = servers["qwen2"]
    adapter = make_adapter(tiny_models["qwen2"], str(tmp_path / "adapter"), seed=2)
    out = str(tmp_path / "gen")
    args = ["generate", "--private", "--adapter", adapter, "--max-new-tokens", "4", "--out", out, *server.cli_args()]
    assert main([*args, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1]]) == 0
    printed = capsys.readouterr().out
    assert "tokens/s" in printed and "bytes/token" in printed
    assert len([f for f in os.listdir(os.path.join(out, "cloud_view")) if f.startswith("Forward-")]) == 4
    assert main(["audit", out, "--tokens", "32", "--search-tokens", "8", "--no-progress"]) == 0
    with open(os.path.join(out, "report.json")) as f:
        privacy = json.load(f)["privacy"]
    assert privacy["measured"] and privacy["sample"]["tokens"] > 8
    assert set(privacy["attacks"]) == {"known", "tuned"}


def test_an_old_server_that_does_not_echo_generation_is_refused(servers, tiny_models, tmp_path):
    """A server that ignores OpenSessionRequest.generation (simulated by a hop clearing the echo) keeps no cache."""
    adapter = make_adapter(tiny_models["llama"], str(tmp_path / "adapter"), seed=4)
    hop = Hop(servers["llama"])

    def old(resp):
        resp.generation, resp.max_cache_tokens = False, 0
        return resp

    hop.on_response["OpenSession"] = old
    try:
        with pytest.raises(ClientError, match="does not support private generation"):
            generate_private(hop.transport_cfg(seal=False), PROMPTS, adapter, NEW)
    finally:
        hop.close()
    assert [name for name, _ in hop.seen] == ["GetInfo", "OpenSession", "CloseSession"], "refused before any Forward"


def test_the_cache_counts_in_the_memory_cap_and_dies_with_the_session(tiny_models, server_factory):
    """Each generation session holds its cache's worst case (--max-cache-tokens) under --memory-cap-mb from its
    open: a tenant cannot grow caches past the cap, and closing a session gives its share back."""
    from transformers import AutoConfig

    from tandem.cloud.generation import kv_bytes_per_token

    config = AutoConfig.from_pretrained(tiny_models["llama"])
    per_session = 256 * kv_bytes_per_token(config, 2, 4)  # two middle blocks (cut 2:2 of six), float32
    cap_mb = 1.5 * per_session / 2**20
    server = server_factory(tiny_models["llama"], "--max-cache-tokens", "256", "--memory-cap-mb", f"{cap_mb:.6f}")
    transport, first = _stub_session(server, retries=0)  # a full cap is retryable: told at once here
    try:
        with pytest.raises(ServerError, match=r"memory cap .* is held by other sessions"):
            open_session(transport, LoraConfig(rank=4, alpha=8), remote_lora=False, generation=True)
        transport.call("CloseSession", pb.CloseSessionRequest(session_id=first.id), retry=False)
        second = open_session(transport, LoraConfig(rank=4, alpha=8), remote_lora=False, generation=True)
        assert list(_forward(transport, second, 2, 128, 0).hidden.shape) == [2, 128, HIDDEN]
    finally:
        transport.close()


def test_an_adapter_on_the_client_blocks_only_sends_no_lora(servers, tiny_models, tmp_path):
    """An offsite-tuned adapter (LoRA on the client's blocks only): the session has no remote LoRA; still exact."""
    model_dir = tiny_models["gpt2"]
    adapter = make_adapter(model_dir, str(tmp_path / "adapter"), seed=6, blocks=[0, 1, 4, 5])
    hop = Hop(servers["gpt2"])
    try:
        result = generate_private(hop.transport_cfg(), PROMPTS, adapter, NEW)
    finally:
        hop.close()
    assert [c["token_ids"] for c in result["completions"]] == merged_generation(model_dir, adapter)
    opened = [request for name, request in hop.seen if name == "OpenSession"]
    assert len(opened) == 1 and not opened[0].remote_lora
    assert not any(request.HasField("lora") for name, request in hop.seen if name == "Forward")


def test_a_retried_forward_gives_the_same_output(servers):
    """A Forward whose reply was lost comes again with the same past_length: the cache goes back, the output is equal."""
    transport, session = _stub_session(servers["llama"])
    try:
        torch.manual_seed(0)
        prompt, token = torch.randn(2, 5, HIDDEN), torch.randn(2, 1, HIDDEN)
        mask = torch.ones(2, 6, dtype=torch.uint8)

        def forward(hidden, past):
            req = pb.ForwardRequest(
                session_id=session.id,
                hidden=serde.to_proto(hidden),
                attention_mask=serde.to_proto(mask[:, : past + hidden.shape[1]]),
                past_length=past,
            )
            return serde.from_proto(transport.call("Forward", req, retry=False).hidden, "hidden")

        forward(prompt, 0)
        first = forward(token, 5)
        again = forward(token, 5)  # the retry: the cache held 6 positions, it is cut back to 5 first
        assert torch.equal(first, again)
        whole, rerun = forward(prompt[:, :3], 0)[:, -1], forward(prompt[:, 2:3], 2)[:, -1]  # back from 3 to 2
        torch.testing.assert_close(rerun, whole, rtol=1e-5, atol=1e-5)  # one query against three: rounding only
    finally:
        transport.call("CloseSession", pb.CloseSessionRequest(session_id=session.id), retry=False)
        transport.close()


def _hostile(servers, tiny_models, tmp_path, rewrite, cut=None):
    """Private generation through a hop that plays a hostile cloud rewriting the OpenSession reply (unsealed, so
    the rewrite stands); returns the raised error and the calls the client made."""
    run = tmp_path / "run"
    adapter = make_adapter(tiny_models["llama"], str(run / "adapter"), seed=5)
    if cut is not None:  # the report.json of the run that tuned the adapter
        (run / "report.json").write_text(json.dumps({"layout": {"bottom": cut[0], "top": cut[1]}}))
    hop = Hop(servers["llama"])
    hop.on_response["OpenSession"] = rewrite
    try:
        with pytest.raises(ClientError) as refused:
            generate_private(hop.transport_cfg(seal=False), PROMPTS, adapter, NEW)
    finally:
        hop.close()
    return str(refused.value), [name for name, _ in hop.seen]


def test_a_cloud_that_announces_a_client_block_as_middle_gets_no_lora(servers, tiny_models, tmp_path):
    """The cloud lists one of the client's own slots (block 0) among the middle slots, or a slot of absurd size:
    refused before any Forward, so the client's own LoRA never travels."""

    def own_block(resp):
        resp.middle_slots.add(name="model.layers.0.self_attn.q_proj", in_features=HIDDEN, out_features=HIDDEN)
        return resp

    def huge(resp):
        resp.middle_slots[0].in_features = 2**31
        return resp

    for rewrite, says in ((own_block, "not in the middle it serves"), (huge, "middle slot of 2147483648")):
        error, calls = _hostile(servers, tiny_models, tmp_path / rewrite.__name__, rewrite)
        assert says in error and "Forward" not in calls, (error, calls)


def test_a_cloud_that_moves_the_cut_is_refused(servers, tiny_models, tmp_path):
    """The cloud announces a smaller bottom than the run was tuned with (to pull a bottom block into the middle):
    the adapter's run recorded its cut, and the client refuses before any Forward."""

    def moved(resp):
        resp.layout.bottom -= 1
        return resp

    error, calls = _hostile(servers, tiny_models, tmp_path, moved, cut=(2, 2))  # the tests' servers cut at 2:2
    assert "but this adapter was tuned at 2:2" in error and "Forward" not in calls, (error, calls)


def test_an_adapter_tuned_with_a_private_bottom_is_refused(tiny_models, tmp_path):
    """The adapter learned against the data owner's private bottom; running it on the shipped bottom would be wrong."""
    from tandem.client.own_adapter import read_adapter
    from tandem.client.privacy.private_bottom import PRIVATE_BOTTOM_FILE

    adapter = make_adapter(tiny_models["llama"], str(tmp_path / "run" / "adapter"), seed=1)
    assert read_adapter(adapter).lora.rank == 4
    (tmp_path / "run" / PRIVATE_BOTTOM_FILE).write_bytes(b"")
    with pytest.raises(ClientError, match="private bottom"):
        read_adapter(adapter)

"""Serving tuned adapters: batched generation over one backbone equals generating alone, and a merged-weights reference."""

from __future__ import annotations

import os
import threading

import grpc
import pytest
import torch
from safetensors.torch import save_file

from tandem.client.cli import build_parser, main
from tandem.client.errors import ServerError
from tandem.client.offsite import push_adapter
from tandem.client.serving import generate
from tandem.cloud.errors import AdapterNotFound, InvalidRequest, NotServable
from tandem.cloud.registry import AdapterRegistry
from tandem.cloud.serving import ServingConfig, ServingService
from tandem.cloud.split import SplitService
from tandem.stages.adapter_files import CLIENT_BLOCKS, read_adapter_dir, sha256
from tandem.stages.arch import arch_for, parts_of
from tandem.stages.loading import load_model
from tandem.stages.lora import LoRAAdapter, LoraConfig, PeftMeta, inject_slots, save_peft
from tandem.stages.modules import StageLayout
from tandem.testing.models import ARCHS

PROMPTS = ["the quick brown fox", "split learning keeps labels", "low rank adapters train"]
NEW = 8


def make_adapter(model_dir: str, out: str, blocks: list[int], seed: int, rank: int = 4) -> str:
    """A peft LoRA adapter on `blocks` with random A and non-zero B, saved as `client tune` saves one."""
    loaded = load_model(model_dir)
    parts = parts_of(loaded.model)
    specs = inject_slots(
        torch.nn.ModuleList(parts.blocks[i] for i in blocks), parts.arch, blocks, parts.arch.lora_targets
    )
    g = torch.Generator().manual_seed(seed)
    adapter = LoRAAdapter(specs, LoraConfig(rank=rank, alpha=2.0 * rank), generator=g)
    with torch.no_grad():
        for b in adapter.b:
            b.copy_(torch.randn(b.shape, generator=g) * 0.5)
    save_peft(adapter, out, PeftMeta(loaded.model_id, fan_in_fan_out=arch_for(loaded.config).fan_in_fan_out))
    return out


def merged_reference(model_dir: str, adapter_dir: str | None) -> torch.nn.Module:
    """A fresh copy of the model with the adapter merged into its weights: W + (alpha / r) B A."""
    from tandem.stages.lora import load_peft_tensors

    model = load_model(model_dir).model
    if adapter_dir is None:
        return model
    cfg, tensors = load_peft_tensors(adapter_dir)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, a in tensors.items():
            if ".lora_A." not in key:
                continue
            path = key.removesuffix(".lora_A.weight")
            delta = cfg["lora_alpha"] / cfg["r"] * (tensors[f"{path}.lora_B.weight"] @ a)  # (out, in)
            layer = modules[path]
            layer.weight += delta.T if type(layer).__name__ == "Conv1D" else delta  # Conv1D stores (in, out)
    return model


def reference_tokens(model: torch.nn.Module, prompt_ids: list[int], new: int, eos: set[int]) -> list[int]:
    """Greedy tokens from Hugging Face's own generate, one prompt, no padding; EOS and what follows dropped."""
    out = model.generate(
        torch.tensor([prompt_ids]),
        attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
        max_new_tokens=new,
        do_sample=False,
        eos_token_id=sorted(eos),
        pad_token_id=min(eos),
    )
    toks = out[0, len(prompt_ids) :].tolist()
    return toks[: next((i for i, t in enumerate(toks) if t in eos), len(toks))]


def _push_local(registry: AdapterRegistry, name: str, adapter_dir: str) -> None:
    registry.push(name, {n: (b, sha256(b)) for n, b in read_adapter_dir(adapter_dir).items()})


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_generation_matches_merged_reference_and_alone(arch, tiny_models, tmp_path):
    """In process: a batch mixing two adapters and the base model equals, token for token, the merged model alone."""
    model_dir = tiny_models[arch]
    a_dir = make_adapter(model_dir, str(tmp_path / "a"), [0, 1, 4, 5], seed=1)  # offsite: client blocks only
    b_dir = make_adapter(model_dir, str(tmp_path / "b"), list(range(6)), seed=2)  # split: every block
    loaded = load_model(model_dir)
    layout = StageLayout.parse("2:2", loaded.config)
    SplitService(loaded, layout)  # puts its slots on the middle blocks first, as `cloud serve` does
    ids = torch.tensor([[5, 9, 17, 33, 2, 8]])
    before = loaded.model(ids).logits
    adapters = AdapterRegistry(loaded.model, loaded.model_id, layout, str(tmp_path / "registry"))
    _push_local(adapters, "a", a_dir)
    _push_local(adapters, "b", b_dir)
    # A long window that never runs out: the batch closes as soon as it holds max_batch sequences.
    svc = ServingService(loaded, adapters, ServingConfig(window_ms=10_000, max_batch=8, adapter_cache=1))
    try:
        assert torch.equal(loaded.model(ids).logits, before), "unbound slots must not change the model"
        jobs = [("a", PROMPTS[:2]), ("", PROMPTS[1:]), ("b", PROMPTS[:1]), ("a", PROMPTS[2:]), ("b", PROMPTS[1:])]
        futures = [svc.submit(name, prompts, NEW) for name, prompts in jobs]  # 8 sequences: one full batch
        batched = [f.result(timeout=120) for f in futures]
        assert {g.batch_sequences for g in batched} == {8}, "one batch for all requests"
        refs = {
            "": merged_reference(model_dir, None),
            "a": merged_reference(model_dir, a_dir),
            "b": merged_reference(model_dir, b_dir),
        }
        for (name, prompts), gen in zip(jobs, batched):
            assert gen.adapter == name
            for prompt, c in zip(prompts, gen.completions):
                want = reference_tokens(refs[name], svc.tokenizer(prompt)["input_ids"], NEW, svc.eos_ids)
                assert c.token_ids == want, (name, prompt)
                assert c.finish_reason == ("length" if len(want) == NEW else "eos")
        by = {
            name: gen.completions[0].token_ids
            for (name, prompts), gen in zip(jobs, batched)
            if prompts[0] == PROMPTS[1]
        }
        assert by["b"] != by[""], "the adapter changes the output"
        # Sampling draws from the request's own generator: the same text in a batch and alone.
        svc.cfg.max_batch = 4
        mixed = [svc.submit("b", PROMPTS, NEW, temperature=1.5, seed=7), svc.submit("a", PROMPTS[:1], NEW)]
        sampled = mixed[0].result(timeout=120)
        mixed[1].result(timeout=120)
        svc.cfg.window_ms = 0
        alone = svc.generate("b", PROMPTS, NEW, temperature=1.5, seed=7)
        assert sampled.batch_sequences == 4 and alone.batch_sequences == 3
        assert [c.token_ids for c in sampled.completions] == [c.token_ids for c in alone.completions]

        with pytest.raises(
            AdapterNotFound,
            match=r"no adapter 'nope' is registered on this server \(yours and public ones: \['a', 'b'\]\).*client push",
        ):
            svc.submit("nope", PROMPTS, NEW)
        with pytest.raises(InvalidRequest, match="prompt 1 is empty"):
            svc.submit("", ["x", ""], NEW)
        with pytest.raises(InvalidRequest, match="over the server's limit of 4"):
            svc.submit("", ["x"] * 5, NEW)
        with pytest.raises(InvalidRequest, match="temperature"):
            svc.submit("", ["x"], NEW, temperature=-1.0)
    finally:
        svc.close()


def test_an_ownerless_registration_is_shared_until_claimed(tiny_models, tmp_path):
    """Registrations from before adapters had owners serve everyone; pushing the same files claims one, and a
    reloaded registry keeps the claim. Another owner's files under the name are refused."""
    from tandem.cloud.errors import NameTaken

    model_dir = tiny_models["llama"]
    loaded = load_model(model_dir)
    layout = StageLayout.parse("2:2", loaded.config)
    registry = str(tmp_path / "registry")
    a_dir = make_adapter(model_dir, str(tmp_path / "a"), [0, 1, 4, 5], seed=1)
    files = {n: (b, sha256(b)) for n, b in read_adapter_dir(a_dir).items()}
    adapters = AdapterRegistry(loaded.model, loaded.model_id, layout, registry)
    assert adapters.push("old", files)[0].owner == ""  # no identity: as registrations made before owners
    assert [r.name for r in adapters.list("bob")] == ["old"] and adapters.lookup("old", "bob") is not None
    other = {
        n: (b, sha256(b))
        for n, b in read_adapter_dir(make_adapter(model_dir, str(tmp_path / "b"), [0, 1, 4, 5], seed=2)).items()
    }
    with pytest.raises(NameTaken, match="the name 'old' is taken"):
        adapters.push("old", other, owner="bob")  # claiming needs the same files
    reg, again = adapters.push("old", files, owner="alice")
    assert again and reg.owner == "alice" and not reg.public
    reloaded = AdapterRegistry(loaded.model, loaded.model_id, layout, registry)
    assert reloaded.list("bob") == [] and reloaded.lookup("old", "bob") is None
    assert reloaded.lookup("old", "alice")[0].owner == "alice" and [r.name for r in reloaded.list()] == ["old"]


def test_adapter_with_retuned_blocks_is_not_servable(tiny_models, tmp_path):
    model_dir = tiny_models["llama"]
    adapter = make_adapter(model_dir, str(tmp_path / "a"), [0, 1], seed=1)
    loaded = load_model(model_dir)
    key = "model.layers.0.mlp.down_proj.weight"
    save_file({key: loaded.model.state_dict()[key].clone()}, os.path.join(adapter, CLIENT_BLOCKS))
    layout = StageLayout.parse("2:2", loaded.config)
    adapters = AdapterRegistry(loaded.model, loaded.model_id, layout, str(tmp_path / "registry"))
    _push_local(adapters, "full", adapter)
    svc = ServingService(loaded, adapters)
    try:
        with pytest.raises(NotServable, match="retunes whole client blocks.*without --tune-client-blocks"):
            svc.submit("full", PROMPTS, NEW)
    finally:
        svc.close()


def test_an_adapter_serves_only_its_owner_unless_public(tiny_models, server_factory, tmp_path, capsys):
    """Under mutual TLS an adapter belongs to the identity that pushed it: another identity neither lists it, nor
    generates with it, nor takes its name, nor learns it exists; pushed again with --public, everyone may use it.
    The registry keeps the owner across a restart."""
    from tandem.client.transport import Transport
    from tandem.cloud.tls import issue_bundle
    from tandem.protos import offsite_pb2 as offsite_pb
    from tandem.protos import offsite_pb2_grpc as offsite_pb_grpc

    model_dir = tiny_models["llama"]
    registry = str(tmp_path / "registry")
    server = server_factory(model_dir, "--adapter-registry", registry)
    alice = server.transport_cfg()  # the 'local' identity
    bob = server.transport_cfg(identity=issue_bundle(server.tls_dir, "bob"))
    adapter = make_adapter(model_dir, str(tmp_path / "a"), [0, 1, 4, 5], seed=1)
    r = push_adapter(alice, adapter, "alices")
    assert (r["owner"], r["public"], r["already_registered"]) == ("local", False, False)
    want = generate(alice, PROMPTS[:1], "alices", NEW)["completions"][0]["token_ids"]

    def listed(transport_cfg):
        transport = Transport(transport_cfg, stub=offsite_pb_grpc.OffsiteTuningStub)
        try:
            resp = transport.call("ListAdapters", offsite_pb.ListAdaptersRequest(), kind="ListAdapters")
            return sorted(a.name for a in resp.adapters)
        finally:
            transport.close()

    assert listed(alice) == ["alices"] and listed(bob) == []
    with pytest.raises(ServerError, match="no adapter 'alices' is registered for identity 'bob'") as e:
        generate(bob, PROMPTS[:1], "alices", NEW)
    assert e.value.code == grpc.StatusCode.NOT_FOUND and "local" not in str(e.value)  # the owner is not named
    other = make_adapter(model_dir, str(tmp_path / "b"), [0, 1, 4, 5], seed=2)
    with pytest.raises(ServerError, match="the name 'alices' is taken") as e:
        push_adapter(bob, other, "alices")
    assert e.value.code == grpc.StatusCode.ALREADY_EXISTS and "digest" not in str(e.value)
    with pytest.raises(ServerError, match="the name 'alices' is taken"):
        push_adapter(bob, adapter, "alices")  # even with the same files: bob cannot claim alice's name
    assert push_adapter(bob, other, "bobs")["owner"] == "bob"
    assert listed(alice) == ["alices"] and listed(bob) == ["bobs"]

    r = push_adapter(alice, adapter, "alices", public=True)
    assert r["public"] and r["already_registered"] and r["owner"] == "local"
    assert generate(bob, PROMPTS[:1], "alices", NEW)["completions"][0]["token_ids"] == want
    assert listed(bob) == ["alices", "bobs"]
    server.stop()
    server = server_factory(model_dir, "--adapter-registry", registry, tls_dir=server.tls_dir)
    assert listed(server.transport_cfg(identity=bob.identity)) == [
        "alices",
        "bobs",
    ]  # owners and the public flag persist
    push_adapter(server.transport_cfg(), adapter, "alices")  # private again
    assert listed(server.transport_cfg(identity=bob.identity)) == ["bobs"]
    capsys.readouterr()
    assert main(["push", *server.cli_args(), "--adapter", adapter, "--name", "alices", "--public"]) == 0
    assert "usable by every identity" in capsys.readouterr().out


def test_serving_through_a_real_server(tiny_models, server_factory, tmp_path, capsys):
    """Push an offsite-style and a split-mode adapter; concurrent requests for both and the base model are batched
    on the server, and each result equals that request generated alone."""
    model_dir = tiny_models["llama"]
    server = server_factory(model_dir, "--adapter-registry", str(tmp_path / "registry"), "--generate-window-ms", "400")
    tcfg = server.transport_cfg()
    pushed = push_adapter(tcfg, make_adapter(model_dir, str(tmp_path / "off"), [0, 1, 4, 5], seed=1), "offsite")
    assert pushed["blocks"] == [0, 1, 4, 5]
    pushed = push_adapter(tcfg, make_adapter(model_dir, str(tmp_path / "split"), list(range(6)), seed=2), "split")
    assert pushed["blocks"] == list(range(6)), (
        "a split-mode adapter (LoRA on the middle blocks too) is published by push"
    )

    requests = [(name, [p]) for name in ("", "offsite", "split") for p in PROMPTS[:2]] + [("split", PROMPTS)]
    alone = [generate(tcfg, prompts, name, NEW) for name, prompts in requests]  # one at a time
    assert all(r["batch_sequences"] == len(p) for r, (_, p) in zip(alone, requests))

    results: list = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def worker(i):
        name, prompts = requests[i]
        start.wait()
        results[i] = generate(tcfg, prompts, name, NEW)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert max(r["batch_sequences"] for r in results) > 3, "concurrent requests were decoded together"
    for (name, _prompts), got, want in zip(requests, results, alone):
        assert [c["token_ids"] for c in got["completions"]] == [c["token_ids"] for c in want["completions"]], name
        assert [c["text"] for c in got["completions"]] == [c["text"] for c in want["completions"]]
    base = {r[1][0]: x["completions"][0]["token_ids"] for r, x in zip(requests, alone) if r[0] == ""}
    for (name, prompts), x in zip(requests, alone):
        if name and len(prompts) == 1:
            assert x["completions"][0]["token_ids"] != base[prompts[0]], f"adapter {name!r} changes the output"

    with pytest.raises(
        ServerError, match=r"no adapter of that name.*no adapter 'nope' is registered.*client push"
    ) as e:
        generate(tcfg, PROMPTS, "nope", NEW)
    assert e.value.code == grpc.StatusCode.NOT_FOUND and e.value.reason == "no-adapter"
    with pytest.raises(ServerError, match="prompt 0 is empty") as e:
        generate(tcfg, [""], "", NEW)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(ServerError):  # mutual TLS: no identity, no generation
        generate(server.transport_cfg(identity=None, retries=0, timeout_s=10), PROMPTS, "", NEW)

    capsys.readouterr()
    rc = main(
        ["generate", *server.cli_args(), "--adapter", "split", "--prompt", PROMPTS[0], "--max-new-tokens", str(NEW)]
    )
    assert rc == 0 and capsys.readouterr().out == alone[4]["completions"][0]["text"] + "\n"
    assert main(["generate", *server.cli_args(), "--adapter", "nope", "--prompt", "x"]) == 2
    assert "client push" in capsys.readouterr().err


def test_generate_help_lists_its_flags(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--help"])
    out = capsys.readouterr().out
    for flag in (
        "--server",
        "--adapter",
        "--prompt",
        "--max-new-tokens",
        "--temperature",
        "--seed",
        "--identity",
        "--ca",
        "--insecure",
    ):
        assert flag in out, flag


def test_one_tenant_cannot_spoil_generation_for_the_others(tiny_models, tmp_path):
    """A tiny temperature, a prompt far over the positions, a rank over a layer's size, a name that differs only in
    case, and an adapter changed on disk: each is refused or confined to its own request."""
    from tandem.cloud.errors import AdapterRejected, NameTaken

    model_dir = tiny_models["llama"]
    loaded = load_model(model_dir)
    layout = StageLayout.parse("2:2", loaded.config)
    SplitService(loaded, layout)
    registry = AdapterRegistry(loaded.model, loaded.model_id, layout, str(tmp_path / "registry"))
    _push_local(registry, "alices", make_adapter(model_dir, str(tmp_path / "a"), [0, 1], seed=1))
    with pytest.raises(NameTaken, match="differ only in case"):
        _push_local(registry, "Alices", make_adapter(model_dir, str(tmp_path / "b"), [0, 1], seed=2))
    with pytest.raises(AdapterRejected, match=r"r=64 is over .* smaller side \((16|32)\)"):
        _push_local(registry, "wide", make_adapter(model_dir, str(tmp_path / "w"), [0], seed=3, rank=64))
    svc = ServingService(loaded, registry, ServingConfig(window_ms=10_000, max_batch=2))
    try:
        svc.cfg.window_ms = 0
        greedy = svc.generate("", PROMPTS[:1], NEW)
        svc.cfg.window_ms = 10_000  # the next two share one batch (it closes when it holds max_batch)
        victim, tiny = svc.submit("", PROMPTS[:1], NEW), svc.submit("", ["x"], NEW, temperature=1e-45, seed=1)
        assert victim.result(timeout=120).batch_sequences == 2
        assert victim.result().completions[0].token_ids == greedy.completions[0].token_ids
        assert tiny.result(timeout=120).completions[0].token_ids  # a near-greedy draw, not NaN
        limit = svc.max_positions * 32
        with pytest.raises(InvalidRequest, match=f"over {limit} characters"):
            svc.submit("", ["ab " * limit], NEW)  # refused before the tokenizer sees it
        weights = os.path.join(registry.lookup("alices")[1], "adapter_model.safetensors")
        with open(weights, "r+b") as f:  # the operator's disk changed under the registration
            f.seek(-1, os.SEEK_END)
            f.write(b" ")
        with pytest.raises(NotServable, match="no longer match its registered digest"):
            svc.submit("alices", PROMPTS[:1], NEW)
    finally:
        svc.close()

"""Private generation (`client generate --private`): the adapter's bottom and top LoRA stay in this process, the cloud
decodes the middle over its KV cache, and the middle's LoRA goes up once, with the first Forward."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from tandem.protos import serde
from tandem.protos import split_pb2 as pb
from tandem.stages.errors import LayoutError
from tandem.stages.kv_cache import embed_cached, new_cache, run_cached
from tandem.stages.lora import Binding, bind, block_of, flatten, inject_slots
from tandem.stages.modules import StageLayout
from tandem.stages.sampling import draw, left_pad

from .assemble import downloaded_parts
from .errors import ClientError, ServerError
from .own_adapter import OwnAdapter, read_adapter
from .session import Session, close_refused_session, open_session
from .transport import Transport, TransportConfig

DEFAULT_NEW_TOKENS = 64  # as the server path's default (cloud serve's ServingConfig.default_new_tokens)


class CachedMiddle:
    """The cloud's middle in a generation session: each call runs the new positions over the session's KV cache."""

    def __init__(self, transport: Transport, session: Session, lora_flat: torch.Tensor | None):
        self.transport, self.session = transport, session
        self.lora_flat = lora_flat  # the middle's LoRA: sent with the first Forward, then held by the cloud
        self.calls = 0
        self.lora_bytes = 0  # what the middle's LoRA added to the first Forward

    def __call__(self, h: torch.Tensor, mask: torch.Tensor, past: int) -> torch.Tensor:
        """The middle's output (B, T, H) for new positions `h` (B, T, H); `mask` (B, past + T) covers past and new."""
        req = pb.ForwardRequest(
            session_id=self.session.id,
            step=self.calls,
            hidden=serde.encode(h, self.session.codec),
            attention_mask=serde.to_proto(mask.to(torch.uint8)),
            past_length=past,
        )
        if self.lora_flat is not None:
            req.lora.CopyFrom(serde.encode(self.lora_flat, self.session.lora_codec))
            self.lora_bytes = req.lora.ByteSize()
        try:
            resp = self.transport.call("Forward", req, kind="Forward", sealer=self.session.sealer, step=self.calls)
        except ServerError as e:
            if e.reason == "no-session":
                raise ClientError(f"the cloud lost the generation session (restarted or expired): {e}") from None
            raise
        self.lora_flat, self.calls = None, self.calls + 1
        self.transport.meter.step_cloud_s += resp.compute_s
        out = serde.decode(resp.hidden, "hidden", self.session.codec, tuple(h.shape))
        return out.to(device=h.device, dtype=h.dtype)


@dataclass
class PrivateRun:
    """The data owner's half of a generation session: its stages with their LoRA bound, and the cloud's middle."""

    parts: object  # tandem.stages.arch.Parts of the client's blocks (bottom first, then top)
    layout: StageLayout
    config: object  # the whole model's config, as the server announced it
    stages_sha256: str
    binding: Binding  # the adapter's bottom and top LoRA: never sent
    middle: CachedMiddle
    tokenizer: object
    eos_ids: set[int]
    pad_id: int
    device: torch.device
    feeds: list[torch.Tensor] = field(default_factory=list)  # the token ids of each Forward (the audit's truth)

    @torch.no_grad()
    def step(self, feed: torch.Tensor, mask: torch.Tensor, past: int, caches) -> torch.Tensor:
        """Logits (B, V) of the last new position: bottom here, middle in the cloud, top here."""
        parts, blocks, bottom = self.parts, list(self.parts.blocks), self.layout.bottom
        self.feeds.append(feed.cpu())
        with bind(self.binding):
            h = embed_cached(parts, feed, mask, past)  # (B, T, H)
            h = run_cached(parts, blocks[:bottom], h, mask, caches[0], past)
        h = self.middle(h, mask, past)
        with bind(self.binding):
            if len(blocks) > bottom:
                h = run_cached(parts, blocks[bottom:], h, mask, caches[1], past)
            return parts.head(parts.norm(h[:, -1:]))[:, -1].float()  # (B, V)


def decode_private(run: PrivateRun, prompts: list[list[int]], max_new: int, temperature: float, seed: int):
    """Generates for all prompts as one batch; per prompt (new token ids, finish reason "eos" or "length").

    The server path's decoding (cloud/decode.py) for one request: left padding, positions that count real tokens,
    greedy argmax or draws from softmax(logits / temperature) with one generator seeded with `seed`, finished rows
    idling on padding until every row is done.
    """
    ids, mask = (x.to(run.device) for x in left_pad(prompts, run.pad_id))  # (B, T) each
    rows = len(prompts)
    generator = torch.Generator().manual_seed(seed) if temperature > 0 else None
    out_ids: list[list[int]] = [[] for _ in prompts]
    reason, done = ["length"] * rows, [False] * rows
    caches = (new_cache(run.parts), new_cache(run.parts))
    feed, past = ids, 0
    for _ in range(max_new):
        logits = run.step(feed, mask, past, caches)  # (B, V)
        nxt = logits.argmax(dim=-1) if generator is None else draw(logits, temperature, generator)
        for row, token in enumerate(nxt.tolist()):
            if done[row]:
                continue
            if token in run.eos_ids:
                done[row], reason[row] = True, "eos"
            else:
                out_ids[row].append(token)
                done[row] = len(out_ids[row]) >= max_new
        if all(done):
            break
        idle = torch.tensor(done, device=run.device)
        feed = torch.where(idle, torch.tensor(run.pad_id, device=run.device), nxt)[:, None]  # (B, 1)
        past = mask.shape[1]
        mask = torch.cat([mask, torch.ones((rows, 1), dtype=mask.dtype, device=run.device)], dim=1)
    return list(zip(out_ids, reason))


def middle_lora(adapter: OwnAdapter, slots) -> torch.Tensor:
    """The adapter's LoRA on the session's middle slots, flat in their order ([A0, B0, A1, ...]; zeros where it has none)."""
    rank, tensors = adapter.lora.rank, []
    for slot in slots:
        a, b = adapter.tensors.get(
            slot.name, (torch.zeros(rank, slot.in_features), torch.zeros(slot.out_features, rank))
        )
        if tuple(a.shape) != (rank, slot.in_features) or tuple(b.shape) != (slot.out_features, rank):
            raise ClientError(f"--adapter: {slot.name} has shapes {list(a.shape)}, {list(b.shape)}: not this model's")
        tensors += [a, b]
    return flatten(tensors)


def check_middle_slots(slots, own: set[str], layout: StageLayout, config, remote: bool) -> None:
    """Refuses middle slots a hostile cloud announces to draw the client's own LoRA up (a slot of a block this
    client runs, or outside the announced middle), any slot when no remote LoRA was asked for, and sizes that are
    not this model's (the client would allocate them)."""
    if slots and not remote:
        raise ClientError("the server announced remote-LoRA slots for a session opened without them; refusing it")
    hidden = int(config.hidden_size)
    limit = 16 * max(hidden, int(getattr(config, "intermediate_size", 0) or 0))
    for slot in slots:
        try:
            block = block_of(slot.name)
        except LayoutError:
            block = -1
        if slot.name in own or block not in layout.middle_blocks:
            raise ClientError(
                f"the server announced {slot.name[:80]!r} as a middle slot, but its block is not in the middle it "
                "serves; refusing it (your own LoRA never leaves this machine)"
            )
        if not (0 < slot.in_features <= limit and 0 < slot.out_features <= limit):
            raise ClientError(f"the server announced a middle slot of {slot.in_features} x {slot.out_features}")


def connect(transport: Transport, adapter: OwnAdapter, device: str = "auto", dtype: str = "auto") -> PrivateRun:
    """Opens a generation session, downloads the client's stages and binds the adapter's own LoRA to them."""
    layout = transport.call("GetInfo", pb.GetInfoRequest(), one_time=True).layout
    middle_blocks = range(layout.bottom, layout.num_layers - layout.top)
    remote = any(block_of(name) in middle_blocks for name in adapter.tensors)  # e.g. offsite adapters: none
    session = open_session(transport, adapter.lora, remote_lora=remote, generation=True)
    info = session.info
    cut = (info.layout.bottom, info.layout.top)
    if adapter.trained_cut not in (None, cut):  # before anything is downloaded or sent
        close_refused_session(transport, session.id)
        raise ClientError(
            f"the server cuts the model at {cut[0]}:{cut[1]}, but this adapter was tuned at {adapter.trained_cut[0]}:"
            f"{adapter.trained_cut[1]}: the LoRA of your own blocks would go to the cloud; refusing"
        )
    config, layout, parts, tokenizer, placement = downloaded_parts(transport, info, device, dtype)
    try:
        client_slots = inject_slots(parts.blocks, parts.arch, layout.client_blocks, adapter.lora.target_modules)
        names = {spec.name for spec in client_slots}
        check_middle_slots(info.middle_slots, names, layout, config, remote)
        middle_names = {slot.name for slot in info.middle_slots}
        stray = sorted(set(adapter.tensors) - names - middle_names)
        if stray:
            raise ClientError(f"--adapter: LoRA on {stray[:3]}, which this server's model and layout do not have")
        own = {n: tuple(x.to(placement.device) for x in ab) for n, ab in adapter.tensors.items() if n in names}
        flat = middle_lora(adapter, info.middle_slots) if info.middle_slots else None
    except ClientError:
        close_refused_session(transport, session.id)
        raise
    eos = getattr(config, "eos_token_id", None)
    eos_ids = {int(e) for e in [*(eos if isinstance(eos, list) else [eos]), tokenizer.eos_token_id] if e is not None}
    pad = tokenizer.pad_token_id
    pad_id = int(pad if pad is not None else min(eos_ids, default=0))
    binding = Binding(own, adapter.lora.scaling)
    middle = CachedMiddle(transport, session, flat)
    stages = info.client_stages_sha256
    return PrivateRun(parts, layout, config, stages, binding, middle, tokenizer, eos_ids, pad_id, placement.device)


def check_arguments(prompts: list[str], max_new_tokens: int, temperature: float, seed: int) -> None:
    """The server path's checks of `client generate`'s arguments."""
    if not prompts:
        raise ClientError("--prompt: give at least one prompt")
    if max_new_tokens < 0:
        raise ClientError(f"--max-new-tokens must be >= 0 (0: {DEFAULT_NEW_TOKENS}), got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ClientError(f"--temperature must be >= 0 (0: greedy), got {temperature}")
    if not 0 <= seed < 2**64:
        raise ClientError(f"--seed must be in [0, 2**64), got {seed}")


def generate_private(
    transport_cfg: TransportConfig,
    prompts: list[str],
    adapter_dir: str,
    max_new_tokens: int = 0,
    temperature: float = 0.0,
    seed: int = 0,
    out: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
) -> dict:
    """Continues each prompt with the adapter in `adapter_dir` (a `client tune` run's adapter/) in split mode.

    Returns the server path's result (`client generate --json`: completions, bytes) plus tokens/s and bytes per
    generated token. With `out`, what the cloud received is recorded there for `client audit OUT`.
    """
    check_arguments(prompts, max_new_tokens, temperature, seed)
    max_new = max_new_tokens or DEFAULT_NEW_TOKENS
    adapter = read_adapter(adapter_dir)
    recorder = None
    if out:
        from .privacy.generation_view import GenerationRecorder

        recorder = GenerationRecorder(out)
    transport = Transport(transport_cfg, recorder=recorder)
    try:
        run = connect(transport, adapter, device, dtype)
        if recorder is not None:
            recorder.sealer_of = lambda: run.middle.session.sealer
        try:
            ids = [run.tokenizer(prompt)["input_ids"] for prompt in prompts]
            check_cache(ids, max_new, run.middle.session.info.max_cache_tokens)
            start = time.perf_counter()
            results = decode_private(run, ids, max_new, temperature, seed)
            seconds = time.perf_counter() - start
        finally:
            close_refused_session(transport, run.middle.session.id)  # the cloud drops the cache and the middle's LoRA
    finally:
        transport.close()
    result = summary(run, ids, results, seconds, transport.meter.totals())
    if recorder is not None:
        recorder.finish(run, adapter_dir, result)
    return result


def check_cache(ids: list[list[int]], max_new: int, max_cache_tokens: int) -> None:
    """Refuses, before any compute, a batch whose cache would pass the server's cap."""
    if any(not prompt for prompt in ids):
        raise ClientError("--prompt: a prompt has no tokens")
    need = len(ids) * (max(len(p) for p in ids) + max_new - 1)
    if max_cache_tokens and need > max_cache_tokens:
        raise ClientError(
            f"{len(ids)} prompts x {max(len(p) for p in ids) + max_new - 1} positions need {need} cached positions, over "
            f"the server's cap of {max_cache_tokens} per session; use fewer prompts or a smaller --max-new-tokens"
        )


def summary(run: PrivateRun, ids, results, seconds: float, totals: dict) -> dict:
    """The result of `client generate --private --json`."""
    forwards = totals["per_kind"].get("Forward", {"sent": 0, "received": 0, "calls": 0})
    generated = sum(len(toks) for toks, _ in results)
    wire = forwards["sent"] + forwards["received"]
    return {
        "adapter": "private",
        "batch_sequences": len(ids),
        "completions": [
            {
                "text": run.tokenizer.decode(toks, skip_special_tokens=True),
                "token_ids": toks,
                "prompt_tokens": len(prompt),
                "finish_reason": why,
            }
            for prompt, (toks, why) in zip(ids, results)
        ],
        "forwards": forwards["calls"],
        "bytes_sent": forwards["sent"],
        "bytes_received": forwards["received"],
        "seconds": seconds,
        "tokens_per_s": generated / seconds if seconds > 0 else 0.0,
        "bytes_per_token": wire / generated if generated else 0.0,
        "lora_bytes": run.middle.lora_bytes,  # once, in the first Forward (counted in bytes_sent)
        "bytes_per_token_without_lora": (wire - run.middle.lora_bytes) / generated if generated else 0.0,
    }

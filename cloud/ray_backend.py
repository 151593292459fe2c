"""The cloud's middle stage on a Ray cluster: replicas for throughput, pipeline shards for size, one gRPC door.

The gRPC front door (the same servicer as `cloud serve`) keeps each session's metadata (owner,
TTL, codecs, sealing) and routes its compute to one replica, so backward always goes where its
forward went. A replica is a chain of `pipeline` actors, each running a contiguous range of the
middle blocks with its own BackboneService. A dead actor is restarted by Ray; its sessions get
NOT_FOUND (reason no-session), and the client's normal recovery opens a new session and redoes the
step, so results are unchanged.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time

import torch

from tandem.stages.loading import LoadedModel, load_model
from tandem.stages.lora import LoraConfig
from tandem.stages.modules import StageLayout

from .batching import BatchingConfig
from .errors import InvalidRequest, SessionNotFound
from .optimizer import AdamWSpec
from .service import BackboneService, ServiceLimits
from .sessions import Session, StoreConfig

log = logging.getLogger(__name__)
NAMESPACE = "tandem"


def _shard_ranges(blocks: list[int], pipeline: int) -> list[list[int]]:
    """Splits the middle blocks into `pipeline` contiguous, near-equal ranges."""
    if not 1 <= pipeline <= len(blocks):
        raise InvalidRequest(f"--pipeline must be between 1 and the {len(blocks)} middle blocks, got {pipeline}")
    n, k = len(blocks), pipeline
    cuts = [round(i * n / k) for i in range(k + 1)]
    return [blocks[cuts[i] : cuts[i + 1]] for i in range(k)]


class MiddleShard:
    """A Ray actor: one contiguous range of middle blocks of one replica (wrapped by ray.remote at start-up)."""

    def __init__(
        self,
        model_path: str | None,
        layout: tuple[int, int, int],
        blocks: list[int],
        store: dict,
        limits: dict,
        threads: int = 0,
        batching: dict | None = None,
    ):
        if threads:
            torch.set_num_threads(threads)
        self.svc = BackboneService(
            load_model(model_path),
            StageLayout(*layout),
            StoreConfig(**store),
            ServiceLimits(**limits),
            blocks=blocks,
            serve_client_files=False,
            batching=BatchingConfig(**batching) if batching is not None else None,
        )

    def ready(self) -> int:
        return len(self.svc.all_slots)

    def open(self, owner, model_id, lora: dict, remote_lora, codec, gcodec, sid, optimizer: dict | None = None) -> int:
        opt = AdamWSpec(**optimizer) if optimizer else None
        return len(
            self.svc.open_session(
                owner, model_id, LoraConfig(**lora), remote_lora, codec, gcodec, sid=sid, optimizer=opt
            ).slots
        )

    def remote_state(self, owner, sid) -> dict:
        return self.svc.remote_state(owner, sid)

    def put_remote_state(self, *args) -> None:
        self.svc.put_remote_state(*args)

    def forward(self, *args):
        return self.svc.forward(*args)

    def backward(self, *args):
        return self.svc.backward(*args)

    def close(self, owner, sid) -> None:
        try:
            self.svc.close_session(owner, sid)
        except SessionNotFound:
            pass


class RayBackbone(BackboneService):
    """BackboneService whose middle compute runs on Ray actors; the servicer cannot tell the difference."""

    def __init__(
        self,
        loaded: LoadedModel,
        layout: StageLayout,
        store: StoreConfig,
        limits: ServiceLimits,
        address: str,
        replicas: int = 1,
        pipeline: int = 1,
        actor_cpus: float = 1.0,
        threads: int = 0,
        shard_resources: list[dict] | None = None,
        batching: BatchingConfig | None = None,
    ):
        """`shard_resources`, if given, is one dict of Ray custom resources per pipeline shard (e.g.
        `[{"zone_a": 1}, {"zone_b": 1}]`): every replica's shard i requires shard_resources[i], which
        pins shards to the nodes that were started with those resources (`ray start --resources`).
        With `batching`, every shard batches the concurrent sessions of its replica (a threaded actor)."""
        import ray

        super().__init__(loaded, layout, store, limits)
        if replicas < 1:
            raise InvalidRequest(f"--replicas must be >= 1, got {replicas}")
        self.ranges = _shard_ranges(layout.middle_blocks, pipeline)
        if shard_resources is not None and (
            len(shard_resources) != pipeline
            or not all(
                isinstance(d, dict)
                and all(isinstance(k, str) and isinstance(v, (int, float)) and v > 0 for k, v in d.items())
                for d in shard_resources
            )
        ):
            raise InvalidRequest(
                f"--ray-shard-resources must be a list of {pipeline} objects (one per pipeline shard) "
                f"mapping resource names to positive amounts, got {shard_resources!r}"
            )
        if not ray.is_initialized():
            if address == "local":
                ray.init(
                    num_cpus=max(2, int(replicas * pipeline * actor_cpus)),
                    include_dashboard=False,
                    namespace=NAMESPACE,
                    log_to_driver=False,
                )
            else:
                ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
        self.ray = ray
        # Batching needs concurrent calls to meet inside an actor: a threaded actor (compute stays serial in its batcher).
        actor = ray.remote(
            max_restarts=-1, max_task_retries=0, num_cpus=actor_cpus, max_concurrency=64 if batching else 1
        )(MiddleShard)
        batch_d = (
            None
            if batching is None
            else {
                "window_ms": batching.window_ms,
                "max_tokens": batching.max_tokens,
                "backward_wait_ms": batching.backward_wait_ms,
            }
        )
        lay = (layout.num_layers, layout.bottom, layout.top)
        store_d = {
            "max_sessions": store.max_sessions,
            "memory_bytes": store.memory_bytes,
            "ttl_s": store.ttl_s,
            "max_sessions_per_identity": 0,
        }  # the front door enforces it; a shard's lingering copies must not
        self.replicas = [
            [
                actor.options(
                    name=f"tandem-replica{r}-shard{i}",
                    get_if_exists=False,
                    **({"resources": shard_resources[i]} if shard_resources else {}),
                ).remote(
                    loaded.path if loaded.model_id != "SmolLM2-135M-Instruct" else None,
                    lay,
                    blocks,
                    store_d,
                    {
                        "max_tokens_per_step": limits.max_tokens_per_step,
                        "cloud_optimizer": limits.cloud_optimizer,
                        "max_lora_rank": limits.max_lora_rank,
                        "max_lora_targets": limits.max_lora_targets,
                    },
                    threads,
                    batch_d,
                )
                for i, blocks in enumerate(self.ranges)
            ]
            for r in range(replicas)
        ]
        ray.get([a.ready.remote() for rep in self.replicas for a in rep])
        self.route: dict[str, int] = {}
        self._rr = itertools.count()
        self._lock = threading.Lock()
        log.info("Ray backend: %d replica(s) x %d pipeline shard(s) over blocks %s", replicas, pipeline, self.ranges)

    def _lost(self, s: Session, owner: str, e: Exception):
        log.warning("replica of session %s... failed (%s); the client will reopen", s.id[:8], type(e).__name__)
        try:
            self.store.close(s.id, owner)
        except SessionNotFound:
            pass
        r = self.route.pop(s.id, None)
        for a in self.replicas[r] if r is not None else []:
            a.close.remote(owner, s.id)  # free what the surviving shards hold; fire and forget
        return SessionNotFound(
            "the replica serving this session failed and was restarted; open a new session "
            "(the client does this automatically and redoes the step)"
        )

    def open_session(
        self, owner, model_id, lora, remote_lora, codec="float32", gradient_codec="float32", sid=None, optimizer=None
    ):
        s = super().open_session(owner, model_id, lora, remote_lora, codec, gradient_codec, optimizer=optimizer)
        opt_d = None if optimizer is None else dataclasses.asdict(optimizer)  # every shard updates its own slice
        with self._lock:
            loads = [sum(1 for v in self.route.values() if v == r) for r in range(len(self.replicas))]
            r = min(range(len(self.replicas)), key=lambda i: (loads[i], (i - next(self._rr)) % len(self.replicas)))
            self.route[s.id] = r
        lora_d = {
            "rank": lora.rank,
            "alpha": lora.alpha,
            "dropout": lora.dropout,
            "target_modules": lora.target_modules,
        }
        deadline = time.monotonic() + 120.0
        while True:  # a replica that Ray is restarting answers again once it has reloaded the model
            try:
                self.ray.get(
                    [
                        a.open.remote(owner, model_id, lora_d, remote_lora, codec, gradient_codec, s.id, opt_d)
                        for a in self.replicas[r]
                    ]
                )
                return s
            except self.ray.exceptions.RayActorError as e:
                if time.monotonic() > deadline:
                    raise self._lost(s, owner, e) from None
                time.sleep(0.5)

    def _slices(self, s: Session) -> list[int]:
        """Number of flat remote-LoRA values owned by each shard (slots are in block order)."""
        sizes = []
        for blocks in self.ranges:
            sizes.append(sum(s.lora_cfg.rank * (x.in_features + x.out_features) for x in s.slots if x.block in blocks))
        return sizes

    def forward(self, owner, sid, step, h, mask, lora_version, lora_flat, dropout_seed, train):
        s = self.store.get(sid, owner)
        self._check_activations(h, mask, "hidden")
        if lora_flat is not None and s.remote_lora and lora_flat.numel() != sum(self._slices(s)):
            raise InvalidRequest(
                f"lora: adapter vector has {lora_flat.numel()} values, expected {sum(self._slices(s))}"
            )
        parts = (
            torch.split(lora_flat, self._slices(s))
            if lora_flat is not None and s.remote_lora
            else [lora_flat] * len(self.ranges)
        )
        total = 0.0
        try:
            for actor, flat in zip(self.replicas[self.route[sid]], parts):
                h, dt = self.ray.get(
                    actor.forward.remote(
                        owner,
                        sid,
                        step,
                        h,
                        mask,
                        lora_version,
                        None if flat is None else flat.contiguous(),
                        dropout_seed,
                        train,
                    )
                )
                total += dt
        except self.ray.exceptions.RayActorError as e:
            raise self._lost(s, owner, e) from None
        return h, total

    def backward(self, owner, sid, step, grad_out):
        s = self.store.get(sid, owner)
        self._check_activations(grad_out, None, "grad_output")
        grads, total = [], 0.0
        try:
            for actor in reversed(self.replicas[self.route[sid]]):
                grad_out, flat, dt = self.ray.get(actor.backward.remote(owner, sid, step, grad_out))
                grads.insert(0, flat)
                total += dt
        except self.ray.exceptions.RayActorError as e:
            raise self._lost(s, owner, e) from None
        return grad_out, torch.cat(grads), total

    def remote_state(self, owner, sid) -> dict:
        s = self.store.get(sid, owner)
        if s.opt_spec is None:
            raise InvalidRequest("this session does not use a cloud optimizer; the client holds its remote LoRA itself")
        try:
            parts = self.ray.get([a.remote_state.remote(owner, sid) for a in self.replicas[self.route[sid]]])
        except self.ray.exceptions.RayActorError as e:
            raise self._lost(s, owner, e) from None
        return {
            "lora": torch.cat([p["lora"] for p in parts]),
            "exp_avg": torch.cat([p["exp_avg"] for p in parts]),
            "exp_avg_sq": torch.cat([p["exp_avg_sq"] for p in parts]),
            "steps": parts[0]["steps"],
            "version": parts[0]["version"],
        }

    def put_remote_state(self, owner, sid, lora, exp_avg, exp_avg_sq, steps, version) -> None:
        s = self.store.get(sid, owner)
        if s.opt_spec is None:
            raise InvalidRequest(
                "this session does not use a cloud optimizer; send the remote LoRA with Forward instead"
            )
        sizes = self._slices(s)
        for name, t in (("lora", lora), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
            if t is None or (t.numel() != sum(sizes) and not (name != "lora" and steps == 0)):
                raise InvalidRequest(f"{name}: expected {sum(sizes)} values, got {None if t is None else t.numel()}")
        split = lambda t: torch.split(t, sizes) if t.numel() else [t] * len(sizes)
        try:
            self.ray.get(
                [
                    a.put_remote_state.remote(
                        owner, sid, lo.contiguous(), m.contiguous(), v.contiguous(), steps, version
                    )
                    for a, lo, m, v in zip(
                        self.replicas[self.route[sid]], split(lora), split(exp_avg), split(exp_avg_sq)
                    )
                ]
            )
        except self.ray.exceptions.RayActorError as e:
            raise self._lost(s, owner, e) from None

    def close_session(self, owner, sid):
        super().close_session(owner, sid)
        r = self.route.pop(sid, None)
        if r is not None:
            for a in self.replicas[r]:
                a.close.remote(owner, sid)

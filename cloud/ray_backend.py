"""The cloud's middle stage on a Ray cluster: replicas for throughput, pipeline shards for size, one gRPC door.

The gRPC front door (the same servicer as `cloud serve`) keeps each session's metadata (owner,
TTL, codecs, sealing) and routes its compute to one replica, so backward always goes where its
forward went. A replica is a chain of `pipeline` actors, each running a contiguous range of the
middle blocks with its own SplitService. A dead actor is restarted by Ray; its sessions get
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

from tandem.stages.loading import LoadedModel
from tandem.stages.lora import LoraConfig
from tandem.stages.modules import StageLayout

from .batching import BatchingConfig
from .errors import InvalidRequest, SessionNotFound
from .limits import ServiceLimits
from .optimizer import AdamWSpec
from .ray_shard import MiddleShard, shard_config, shard_ranges
from .sessions import Session, StoreConfig
from .split import SplitService

log = logging.getLogger(__name__)
NAMESPACE = "tandem"


def check_shard_resources(shard_resources: list[dict] | None, pipeline: int) -> None:
    """InvalidRequest unless `shard_resources` is None or one {resource name: positive amount} per shard."""
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


def connect(address: str, cpus: float):
    """Joins the Ray cluster at `address` ("local": starts one with `cpus` CPUs); returns the ray module."""
    import ray

    if not ray.is_initialized():
        if address == "local":
            ray.init(num_cpus=max(2, int(cpus)), include_dashboard=False, namespace=NAMESPACE, log_to_driver=False)
        else:
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
    return ray


class RaySplitService(SplitService):
    """A SplitService whose middle compute runs on Ray actors; the servicer cannot tell the difference.

    The front door keeps the sessions (owners, TTLs, sealing) in its own store; each replica's shards
    keep a copy of each session it serves, under the same id and owner."""

    kill_revive = False  # the shards take whole adapters: no live slots (cloud/remote_lora.py)
    generation = False  # the middle runs in the shards: no KV cache of it here

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
        super().__init__(loaded, layout, store, limits)
        if replicas < 1:
            raise InvalidRequest(f"--replicas must be >= 1, got {replicas}")
        self.ranges = shard_ranges(layout.middle_blocks, pipeline)
        check_shard_resources(shard_resources, pipeline)
        self.ray = connect(address, replicas * pipeline * actor_cpus)
        # Batching needs concurrent calls to meet inside an actor: a threaded actor (compute stays serial in its batcher).
        actor = self.ray.remote(
            max_restarts=-1,
            max_task_retries=0,
            num_cpus=actor_cpus,
            num_gpus=1 if loaded.placement.device.type == "cuda" else 0,  # --device cuda: a GPU per shard
            max_concurrency=64 if batching else 1,
        )(MiddleShard)
        config = shard_config(loaded, layout, store, limits, batching)
        self.replicas = [
            [
                actor.options(
                    name=f"tandem-replica{r}-shard{i}",
                    get_if_exists=False,
                    **({"resources": shard_resources[i]} if shard_resources else {}),
                ).remote(blocks=blocks, threads=threads, **config)
                for i, blocks in enumerate(self.ranges)
            ]
            for r in range(replicas)
        ]
        self.ray.get([shard.ready.remote() for replica in self.replicas for shard in replica])
        self.route: dict[str, int] = {}
        self._rr = itertools.count()
        self._lock = threading.Lock()
        log.info("Ray backend: %d replica(s) x %d pipeline shard(s) over blocks %s", replicas, pipeline, self.ranges)

    def _lost(self, session: Session, e: Exception) -> SessionNotFound:
        """Closes a session whose replica failed; returns the error that tells the client to reopen."""
        log.warning("replica of session %s... failed (%s); the client will reopen", session.id[:8], type(e).__name__)
        self.store.close(session)
        r = self.route.pop(session.id, None)
        for shard in self.replicas[r] if r is not None else []:
            shard.close.remote(session.owner, session.id)  # free what the surviving shards hold; fire and forget
        return SessionNotFound(
            "the replica serving this session failed and was restarted; open a new session "
            "(the client does this automatically and redoes the step)"
        )

    def _shards(self, session: Session) -> list:
        """The shard actors of the replica that serves `session`, in block order."""
        return self.replicas[self.route[session.id]]

    def open_session(
        self,
        owner: str,
        model_id: str,
        lora: LoraConfig,
        remote_lora: bool,
        codec: str = "float32",
        gradient_codec: str = "float32",
        sid: str | None = None,
        optimizer: AdamWSpec | None = None,
    ) -> Session:
        """Opens the session at the door, routes it to the least loaded replica and opens it on its shards."""
        session = super().open_session(owner, model_id, lora, remote_lora, codec, gradient_codec, optimizer=optimizer)
        spec = None if optimizer is None else dataclasses.asdict(optimizer)  # every shard updates its own slice
        with self._lock:
            loads = [sum(1 for v in self.route.values() if v == r) for r in range(len(self.replicas))]
            r = min(range(len(self.replicas)), key=lambda i: (loads[i], (i - next(self._rr)) % len(self.replicas)))
            self.route[session.id] = r
        lora_fields = dataclasses.asdict(lora)
        deadline = time.monotonic() + 120.0
        while True:  # a replica that Ray is restarting answers again once it has reloaded the model
            try:
                self.ray.get(
                    [
                        shard.open.remote(
                            owner, model_id, lora_fields, remote_lora, codec, gradient_codec, session.id, spec
                        )
                        for shard in self.replicas[r]
                    ]
                )
                return session
            except self.ray.exceptions.RayActorError as e:
                if time.monotonic() > deadline:
                    raise self._lost(session, e) from None
                time.sleep(0.5)

    def _slices(self, session: Session) -> list[int]:
        """Number of flat remote-LoRA values owned by each shard (slots are in block order)."""
        rank = session.lora_cfg.rank
        return [
            sum(rank * (x.in_features + x.out_features) for x in session.slots if x.block in b) for b in self.ranges
        ]

    def forward(
        self,
        session: Session,
        step: int,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        lora_version: int,
        lora_flat: torch.Tensor | None,
        dropout_seed: int,
        train: bool,
        live: list[bool] | None = None,
    ) -> tuple[torch.Tensor, float]:
        """Runs the replica's shards in turn, each with its slice of the remote LoRA (`live`: never set here, since
        this backend does not agree to Kill-and-Revive; refused if it is)."""
        if live is not None:
            raise InvalidRequest("this server's backend (Ray) does not serve Kill-and-Revive sessions")
        self.checks.activations(hidden, mask, "hidden")
        sliced = lora_flat is not None and session.remote_lora
        if sliced and lora_flat.numel() != sum(self._slices(session)):
            raise InvalidRequest(
                f"lora: adapter vector has {lora_flat.numel()} values, expected {sum(self._slices(session))}"
            )
        parts = torch.split(lora_flat, self._slices(session)) if sliced else [lora_flat] * len(self.ranges)
        total = 0.0
        try:
            for actor, flat in zip(self._shards(session), parts):
                flat = None if flat is None else flat.contiguous()
                call = actor.forward.remote(
                    session.owner, session.id, step, hidden, mask, lora_version, flat, dropout_seed, train
                )
                hidden, seconds = self.ray.get(call)
                total += seconds
        except self.ray.exceptions.RayActorError as e:
            raise self._lost(session, e) from None
        return hidden, total

    def backward(self, session: Session, step: int, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Runs the replica's shards backwards; the LoRA gradient is their slices in block order."""
        self.checks.activations(grad_out, None, "grad_output")
        grads, total = [], 0.0
        try:
            for actor in reversed(self._shards(session)):
                call = actor.backward.remote(session.owner, session.id, step, grad_out)
                grad_out, flat, seconds = self.ray.get(call)
                grads.insert(0, flat)
                total += seconds
        except self.ray.exceptions.RayActorError as e:
            raise self._lost(session, e) from None
        return grad_out, torch.cat(grads), total

    def remote_state(self, session: Session) -> dict:
        """The shards' slices of the remote LoRA and AdamW state, joined."""
        if session.opt_spec is None:
            raise InvalidRequest("this session does not use a cloud optimizer; the client holds its remote LoRA itself")
        try:
            shards = self._shards(session)
            parts = self.ray.get([shard.remote_state.remote(session.owner, session.id) for shard in shards])
        except self.ray.exceptions.RayActorError as e:
            raise self._lost(session, e) from None
        joined = {name: torch.cat([p[name] for p in parts]) for name in ("lora", "exp_avg", "exp_avg_sq")}
        return {**joined, "steps": parts[0]["steps"], "version": parts[0]["version"]}

    def put_remote_state(
        self,
        session: Session,
        lora: torch.Tensor | None,
        exp_avg: torch.Tensor,
        exp_avg_sq: torch.Tensor,
        steps: int,
        version: int,
    ) -> None:
        """Hands each shard its slice of the remote LoRA and AdamW state."""
        if session.opt_spec is None:
            raise InvalidRequest(
                "this session does not use a cloud optimizer; send the remote LoRA with Forward instead"
            )
        sizes = self._slices(session)
        for name, t in (("lora", lora), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
            if t is None or (t.numel() != sum(sizes) and not (name != "lora" and steps == 0)):
                raise InvalidRequest(f"{name}: expected {sum(sizes)} values, got {None if t is None else t.numel()}")

        def split(t: torch.Tensor) -> list[torch.Tensor]:
            return [x.contiguous() for x in torch.split(t, sizes)] if t.numel() else [t.contiguous()] * len(sizes)

        owner, sid, shards = session.owner, session.id, self._shards(session)
        try:
            self.ray.get(
                [
                    shard.put_remote_state.remote(owner, sid, *state, steps, version)
                    for shard, *state in zip(shards, split(lora), split(exp_avg), split(exp_avg_sq))
                ]
            )
        except self.ray.exceptions.RayActorError as e:
            raise self._lost(session, e) from None

    def close_session(self, session: Session) -> None:
        """Closes the session at the door and on its replica's shards (fire and forget)."""
        super().close_session(session)
        r = self.route.pop(session.id, None)
        if r is not None:
            for shard in self.replicas[r]:
                shard.close.remote(session.owner, session.id)

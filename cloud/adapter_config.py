"""Checks an uploaded adapter_config.json: plain LoRA that this server serves exactly as peft would load it."""

from __future__ import annotations

import json
from dataclasses import dataclass

MAX_CONFIG_BYTES = 64 * 1024
MAX_RANK = 4096
MAX_ALPHA = 1e6

# Options that only describe the run or the file (any value of the right type is harmless here).
_INFO = {
    "task_type": (str, type(None)),
    "inference_mode": (bool,),
    "revision": (str, type(None)),
    "peft_version": (str, type(None)),
    "auto_mapping": (dict, type(None)),
    "megatron_core": (str, type(None)),
    "qalora_group_size": (int,),
    "layers_pattern": (str, list, type(None)),
    "lora_dropout": (int, float),
}
# Options peft understands that change what the adapter computes; only their "off" value is served.
_OFF = (
    "use_dora",
    "modules_to_save",
    "rank_pattern",
    "alpha_pattern",
    "layer_replication",
    "megatron_config",
    "loftq_config",
    "use_qalora",
    "lora_bias",
    "target_parameters",
    "trainable_token_indices",
    "eva_config",
    "corda_config",
    "exclude_modules",
    "runtime_config",
    "alora_invocation_tokens",
    "arrow_config",
)
# Options this server knows: the ones it checks, the harmless ones and the ones served only when off.
_KNOWN = {
    "peft_type",
    "base_model_name_or_path",
    "r",
    "lora_alpha",
    "use_rslora",
    "fan_in_fan_out",
    "bias",
    "target_modules",
    "layers_to_transform",
    "init_lora_weights",
    *_INFO,
    *_OFF,
}


class ConfigError(ValueError):
    """adapter_config.json is not plain LoRA of the served model; the message names the field."""


@dataclass(frozen=True)
class LoraSettings:
    """What the rest of the push check needs from a valid config."""

    rank: int
    alpha: float
    targets: frozenset[str]
    layers: frozenset[int] | None  # layers_to_transform; None: every block


def _off(v) -> bool:
    """An option's "not used" value (0 is not: it is a setting)."""
    return v is None or v is False or v == {} or v == [] or v == ""


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_config(raw: bytes, model_id: str, leaves: set[str], fan_in_fan_out: bool, num_layers: int) -> LoraSettings:
    """Parses and checks adapter_config.json against the served model.

    Args:
        raw: The file's bytes.
        model_id: The served model; the adapter must name it as its base.
        leaves: Names of the layers LoRA may target in the served model's blocks (q_proj, c_attn...).
        fan_in_fan_out: What the served architecture stores (True for GPT-2's Conv1D).
        num_layers: Blocks of the served model.

    Raises:
        ConfigError: naming the first field that is wrong, and what it should be.
    """
    cfg = _read_json(raw)
    if cfg.get("peft_type") != "LORA":
        raise ConfigError(f"peft_type {cfg.get('peft_type')!r}, expected 'LORA'")
    base = cfg.get("base_model_name_or_path")
    if base != model_id:
        raise ConfigError(
            f"the adapter was tuned for {base!r}, this server serves {model_id!r}; "
            "tune against this model's emulator or server"
        )
    rank, targets, alpha = _check_lora(cfg, model_id, leaves)
    _check_options(cfg, fan_in_fan_out)
    return LoraSettings(rank, float(alpha), frozenset(targets), _check_layers(cfg, num_layers))


def _read_json(raw: bytes) -> dict:
    """The config as a JSON object, bounded in size and free of NaN / Infinity."""
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"is {len(raw)} bytes; a LoRA config is at most {MAX_CONFIG_BYTES}")
    try:
        cfg = json.loads(raw, parse_constant=lambda c: _reject_constant(c))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ConfigError(f"is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"must be a JSON object, got {type(cfg).__name__}")
    return cfg


def _check_lora(cfg: dict, model_id: str, leaves: set[str]) -> tuple[int, list[str], int | float]:
    """The adapter's (r, target_modules, lora_alpha), each checked against the served model."""
    rank = cfg.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= MAX_RANK:
        raise ConfigError(f"r must be an integer in 1..{MAX_RANK}, got {rank!r}")
    targets = cfg.get("target_modules")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise ConfigError(f"target_modules must be a non-empty list of layer names, got {targets!r}")
    missing = sorted(set(targets) - leaves)
    if missing:
        raise ConfigError(
            f"target_modules {missing} name layers the served model {model_id!r} does not have; was it "
            f"tuned for another architecture? (its blocks have {sorted(leaves)})"
        )
    alpha = cfg.get("lora_alpha", rank)
    if not _number(alpha) or not 0 < alpha <= MAX_ALPHA:
        raise ConfigError(f"lora_alpha must be a finite number in (0, {MAX_ALPHA:g}], got {alpha!r}")
    return rank, targets, alpha


def _check_options(cfg: dict, fan_in_fan_out: bool) -> None:
    """Every other option: harmless, or off when it would change what the adapter computes."""
    dropout = cfg.get("lora_dropout", 0.0)
    if not _number(dropout) or not 0 <= dropout < 1:
        raise ConfigError(f"lora_dropout must be a number in [0, 1), got {dropout!r}")
    if cfg.get("use_rslora", False) not in (True, False):
        raise ConfigError(f"use_rslora must be true or false, got {cfg.get('use_rslora')!r}")
    fifo = cfg.get("fan_in_fan_out", fan_in_fan_out)
    if fifo is not fan_in_fan_out:
        raise ConfigError(f"fan_in_fan_out is {fifo!r}, the served architecture needs {fan_in_fan_out}")
    if cfg.get("bias", "none") != "none":
        raise ConfigError(f"bias {cfg.get('bias')!r} is not served (it trains the base layers' biases); use 'none'")
    for key in _OFF:
        if not _off(cfg.get(key)):
            raise ConfigError(f"{key} is not supported here (served adapters are plain LoRA); leave it unset")
    # "pissa", "olora"... change the base weights
    if cfg.get("init_lora_weights", True) not in (True, False, "gaussian"):
        raise ConfigError(f"init_lora_weights {cfg.get('init_lora_weights')!r} is not supported; use true")
    for key, value in cfg.items():
        if key in _INFO and not isinstance(value, _INFO[key]):
            raise ConfigError(f"{key} has the wrong type ({type(value).__name__})")
    # Options this server does not know are accepted only when off: newer peft versions save every option they
    # have, at its default, and a default-off option cannot change what the adapter computes.
    unknown = sorted(k for k in set(cfg) - _KNOWN if not _off(cfg[k]))
    if unknown:
        raise ConfigError(
            f"unsupported options {unknown[:5]}; served adapters are plain LoRA (see `client tune`'s adapter/)"
        )


def _check_layers(cfg: dict, num_layers: int) -> frozenset[int] | None:
    """layers_to_transform as a set of blocks, or None for every block."""
    layers = cfg.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if layers is None:
        return None
    if not isinstance(layers, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < num_layers for i in layers
    ):
        raise ConfigError(
            f"layers_to_transform must list blocks in 0..{num_layers - 1}, got {cfg.get('layers_to_transform')!r}"
        )
    return frozenset(layers)


def _reject_constant(name: str):
    """json.loads would accept NaN / Infinity; a config never needs them."""
    raise ConfigError(f"contains {name}; numbers must be finite")

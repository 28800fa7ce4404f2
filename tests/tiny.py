"""Tiny models and tokenizers built from configs in milliseconds, offline, for unit tests.

The tokenizer is a byte-level BPE trained on a few sentences, so it can encode any text, with a
ChatML chat template like SmolLM2's."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
_CORPUS = [
    "The capital of France is Paris. The capital of Japan is Tokyo.",
    "What is 2 + 3? The answer is 5. What is 7 * 6? The answer is 42.",
    "A teacher model distills knowledge into a smaller student model.",
    "user assistant system: explain photosynthesis in one sentence, please.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 Hello world! How are you today?",
]


def make_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


_OTHER_CORPUS = [
    "paris tokyo france japan capital answer",
    "teacher student model knowledge smaller",
    "photosynthesis sentence explain please hello world",
]


def make_other_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A second byte-level BPE for cross-tokenizer tests: other merges (a lowercase corpus), another
    vocabulary size, other special tokens and ids, and NO chat template (like a base model)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>", "<bos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_OTHER_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


def make_tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    *,
    layers: int = 2,
    hidden: int = 32,
    heads: int = 4,
    seed: int = 0,
) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def save_tiny_model_dir(path: Path, **model_kwargs: int) -> Path:
    """A complete HF model dir (weights, config, tokenizer with chat template, generation config)."""
    tokenizer = make_tokenizer()
    model = make_tiny_model(tokenizer, **model_kwargs)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_hub_snapshot(
    model_dir: Path, hub_cache: Path, repo_id: str, *, commit: str = "c0ffee" * 6 + "abcd"
) -> Path:
    """Lay `model_dir`'s files out as the Hugging Face cache holds a downloaded model
    (`models--ORG--NAME/{blobs,snapshots/<commit>,refs/main}`, each snapshot file a relative
    symlink to its blob named by its sha256), so Hub-name resolution is tested with no network.
    Returns the snapshot dir."""
    import hashlib
    import os
    import shutil

    repo = hub_cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in sorted(p for p in model_dir.iterdir() if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        link = snapshot / file.name
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot

"""Supervised fine-tuning (conditional) data: prompt/response pairs as fixed-length samples.

Input: JSONL, one example per line, either ``{"prompt": str, "response": str}`` or
``{"messages": [{"role": ..., "content": ...}, ...]}`` rendered with ``data.chat_template``
(a Python format string applied to every message with ``{role}`` and ``{content}``; the last
message must be the assistant's and is the response, everything before it, plus the
template's prefix for that last message, is the prompt).

Each example becomes ``prompt + response + EOT`` padded with EOT to ``seq_len`` tokens, as in
LLaDA's SFT (Nie et al. 2025, Sec. 2.3 and Appendix B): the padding EOTs belong to the
response, are noised and trained on like any response token (so the model learns to end a
response, i.e. to control the length), and count in the response length that normalises the
loss. Too long examples are cut: the response keeps at least one token, the prompt is cut
from the left.

A sample is an int64 array of ``seq_len + 1``: the tokens, then the prompt length (the
objective, ``SFTMaskedDiffusion``, splits it off); ``sample_width`` is that width.

Variable length (``data.sft_padding=batch``, the default): the trainer cuts every sample of a
global batch to ``batch_length(indices)``, the batch's longest example (prompt + response +
one EOT) rounded up to a multiple of 8 and at most ``seq_len``. Cutting a sample padded to
``seq_len`` at that length is the same as padding it only that far, so the EOT padding
still belongs to the response, up to the batch's length. The length depends on the whole
global batch (every rank computes it from the step's sample indices), so all ranks and
micro-batches of a step share one length and the layouts stay equal.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from dlm_megatron.data import DataError
from dlm_megatron.data.jsonl import jsonl_records

DEFAULT_CHAT_TEMPLATE = "<|{role}|>\n{content}\n"


def render_messages(messages: list, template: str) -> tuple[str, str]:
    """(prompt, response) text of a chat: the last message (assistant) is the response."""
    if not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise DataError("'messages' must be a non-empty list of {\"role\", \"content\"} objects")
    if "{content}" not in template:
        raise DataError(f"data.chat_template {template!r} lacks '{{content}}'")
    *ctx, last = messages
    prefix = template.split("{content}")[0].format(role=last["role"])
    prompt = "".join(template.format(role=m["role"], content=m["content"]) for m in ctx) + prefix
    return prompt, str(last["content"])


PAD_MULTIPLE = 8
"""Padded SFT batch lengths are multiples of this (friendly to tensor cores and kernels)."""


def pad_multiple(objective: str = "masked", block_size: int = 1) -> int:
    """What a padded batch length is a multiple of: 8, and for block diffusion also the block
    size (its blocks must tile the sequence).  -> int"""
    return math.lcm(PAD_MULTIPLE, block_size) if objective == "block" else PAD_MULTIPLE


def content_length(prompt_len: int, response_len: int, seq_len: int) -> int:
    """Tokens of prompt + response + one EOT as ``encode_example`` keeps them (at most seq_len)."""
    return min(seq_len, min(prompt_len, seq_len - 1) + response_len + 1)


def batch_length(lengths, multiple: int, seq_len: int) -> int:
    """The length a batch of examples with content ``lengths`` is padded to: the longest
    rounded up to a multiple of ``multiple``, at most ``seq_len``."""
    longest = int(np.max(lengths))
    return min(seq_len, -(-longest // multiple) * multiple)


def cut_to_length(x_BW: np.ndarray, length: int) -> np.ndarray:
    """Samples padded to seq_len ([B, seq_len + 1]) as samples padded to ``length`` (>= each
    one's content length): the first ``length`` tokens, then the prompt length.  -> [B, length + 1]"""
    return np.concatenate([x_BW[:, :length], x_BW[:, -1:]], axis=1)


def encode_example(prompt_ids: list[int], response_ids: list[int], seq_len: int, eot_id: int) -> np.ndarray:
    """[seq_len + 1]: prompt + response + EOT padding (cut to fit), then the prompt length."""
    if seq_len < 2:
        raise DataError(f"data.seq_len={seq_len} is too short for SFT")
    resp = list(response_ids) + [eot_id]
    max_prompt = seq_len - 1
    prompt = list(prompt_ids)[-max_prompt:] if len(prompt_ids) > max_prompt else list(prompt_ids)
    room = seq_len - len(prompt)
    resp = resp[:room] + [eot_id] * max(0, room - len(resp))
    out = np.array(prompt + resp + [len(prompt)], dtype=np.int64)
    assert out.shape[0] == seq_len + 1
    return out


class SFTDataset:
    """All examples of a JSONL file, tokenized once (kept in memory)."""

    def __init__(self, path: str | Path, tokenizer, seq_len: int, chat_template: str = DEFAULT_CHAT_TEMPLATE,
                 pad_to_batch: int | None = None):
        """``pad_to_batch``: the multiple a global batch's length is rounded up to
        (``batch_length``); None pads every example to ``seq_len``."""
        p = Path(path)
        if not p.is_file():
            raise DataError(f"data.sft_path '{path}' does not exist")
        prompts, responses = [], []
        for n, obj in jsonl_records(p.read_text(encoding="utf-8"), path, DataError):
            if isinstance(obj, dict) and "messages" in obj:
                pr, rs = render_messages(obj["messages"], chat_template)
            elif isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and isinstance(obj.get("response"), str):
                pr, rs = obj["prompt"], obj["response"]
            else:
                raise DataError(f"{path}:{n} needs {{\"prompt\", \"response\"}} strings or a \"messages\" list")
            prompts.append(pr)
            responses.append(rs)
        if not prompts:
            raise DataError(f"data.sft_path '{path}' holds no examples")
        pi, ri = tokenizer.encode_batch(prompts), tokenizer.encode_batch(responses)
        self.samples = np.stack([encode_example(a, b, seq_len, tokenizer.eot_id) for a, b in zip(pi, ri)])
        self.lengths = np.array([content_length(len(a), len(b), seq_len) for a, b in zip(pi, ri)], dtype=np.int64)
        self.seq_len = seq_len
        self.sample_width = seq_len + 1
        self.pad_to_batch = pad_to_batch

    def batch_length(self, indices) -> int:
        """Tokens per sample of the global batch ``indices``: its longest example rounded up to
        a multiple of ``pad_to_batch`` (at most seq_len), or seq_len when that is None."""
        if self.pad_to_batch is None:
            return self.seq_len
        return batch_length(self.lengths[np.asarray(indices, dtype=np.int64)], self.pad_to_batch, self.seq_len)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.samples[int(i)]

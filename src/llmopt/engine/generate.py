"""The generation loop: batched prompts (left-padded), prefill, token-by-token decode, stop tokens, streaming.

    out = generate(model, ["Hello", "Bonjour"], max_new_tokens=32, temperature=0.7, top_p=0.9, seed=1,
                   stream=lambda i, token_id, text: print(text, end=""))
    out.tokens[i], out.texts[i], out.timings   # prefill_s, decode_s, ttft_s, prefill/decode tokens/s, decode_path

A prompt is a string (tokenized with the folder's tokenizer; ``chat=True`` applies the chat template), a list of
token ids, or a list of either for a batch. Each sequence stops at a stop token (config/generation_config eos and
end-of-turn tokens, plus ``stop_ids``) or after ``max_new_tokens``; the batch stops when all have.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from llmopt.engine.sampling import Sampler
from llmopt.errors import LlmoptError


@dataclass
class Generation:
    tokens: list[list[int]]  # generated ids per sequence (stop token excluded)
    prompt_tokens: list[list[int]]
    texts: list[str] | None = None
    finish: list[str] = field(default_factory=list)  # "stop" or "length" per sequence
    timings: dict = field(default_factory=dict)


def _as_batch(model, prompt, chat: bool, images) -> tuple[list[list[int]], bool]:
    """Token id lists of the batch, and whether the input was text."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if isinstance(prompt, torch.Tensor):
        prompt = prompt.tolist() if prompt.dim() == 2 else [prompt.tolist()]
    if not isinstance(prompt, list) or not prompt:
        raise LlmoptError("generate: prompt must be a string, a list of token ids, or a non-empty list of either")
    is_text = isinstance(prompt[0], str)
    batch = []
    for p in prompt:
        if isinstance(p, str):
            n_images = len(images or [])
            ids = model.tokenizer.chat(p, n_images) if chat else model.tokenizer.encode(p)
            if n_images and not chat:
                raise LlmoptError("generate: image prompts need the chat template (chat=True)")
            batch.append(ids)
        else:
            batch.append([int(t) for t in p])
    if any(len(ids) == 0 for ids in batch):
        raise LlmoptError("generate: a prompt is empty")
    return batch, is_text


def generate(model, prompt, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = 0, stop_ids=None, chat: bool = False,
             images: list | None = None, stream: Callable[[int, int, str | None], None] | None = None,
             pad_id: int | None = None) -> Generation:
    """Generate up to ``max_new_tokens`` per prompt; ``stream(seq_index, token_id, text_piece)`` per new token."""
    if max_new_tokens < 0:
        raise LlmoptError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    if images and model.args.vision is None:
        raise LlmoptError(f"{model.folder}: model_type {model.args.family} takes no images (text-only model)")
    sampler = Sampler(temperature, top_k, top_p, seed)
    batch, is_text = _as_batch(model, prompt, chat, images)
    image_inputs = None
    if images:
        from llmopt.engine.vision import expand_image_tokens, pixel_bounds, preprocess_image

        if len(batch) != 1:
            raise LlmoptError("generate: images are supported for a single prompt (batch of 1)")
        bounds = pixel_bounds(model.folder)
        image_inputs = [img if hasattr(img, "grid_thw") else preprocess_image(img, model.args.vision, **bounds)
                        for img in images]
        batch = [expand_image_tokens(batch[0], image_inputs, model.args)]
    tok = model.tokenizer if is_text else _tokenizer_or_none(model)
    stops = set(stop_ids or []) | (tok.stop_ids() if tok else set(model.args.eos_token_ids))
    B, T = len(batch), max(len(ids) for ids in batch)
    context = T + max_new_tokens
    if context > model.args.max_position:
        raise LlmoptError(f"prompt of {T} tokens + {max_new_tokens} new tokens exceeds the model context of "
                          f"{model.args.max_position} tokens")
    pad = pad_id if pad_id is not None else (model.args.pad_token_id or 0)
    ids = torch.full((B, T), pad, dtype=torch.int64)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for i, p in enumerate(batch):
        ids[i, T - len(p):] = torch.tensor(p)
        mask[i, T - len(p):] = True

    decoders = None
    if stream is not None and tok is not None:
        from llmopt.engine.tokenizer import StreamDecoder

        decoders = [StreamDecoder(tok) for _ in range(B)]
    out = [[] for _ in range(B)]
    finish = ["length"] * B
    done = torch.zeros(B, dtype=torch.bool)
    t0 = time.perf_counter()
    logits, state = model.prefill(ids, mask, max_len=max(context, T + 1), images=image_inputs)
    t_prefill = time.perf_counter() - t0
    t_first = None

    def emit(next_ids) -> bool:
        """Take one step's ids (stream them, note stops); True once every sequence has stopped."""
        nonlocal t_first
        if t_first is None:
            t_first = time.perf_counter() - t0
        for i in range(B):
            if done[i]:
                continue
            token = int(next_ids[i])
            if token in stops:
                done[i], finish[i] = True, "stop"
                continue
            out[i].append(token)
            if stream is not None:
                stream(i, token, decoders[i].push(token) if decoders else None)
        return bool(done.all())

    next_ids = sampler(logits)
    if max_new_tokens and not emit(next_ids):
        if sampler.greedy:  # the argmax may run on the device (replayed Vulkan step, two in flight): no logits back
            model.decode_greedy_steps(state, next_ids, max_new_tokens - 1, stop=emit)
        else:
            for _ in range(max_new_tokens - 1):
                next_ids = sampler(model.decode_step(state, next_ids.masked_fill(done, pad)))
                if emit(next_ids):
                    break
    total = time.perf_counter() - t0
    n_decode = max(len(o) for o in out) if out else 0
    decode_s = total - (t_first or t_prefill)
    timings = {
        "prefill_s": t_prefill, "ttft_s": t_first or t_prefill, "total_s": total, "decode_s": decode_s,
        "prompt_tokens": int(mask.sum()), "new_tokens": sum(len(o) for o in out),
        "prefill_tok_s": int(mask.sum()) / t_prefill if t_prefill > 0 else None,
        "decode_tok_s": B * (n_decode - 1) / decode_s if n_decode > 1 and decode_s > 0 else None,
        "decode_path": state.decode_path,
    }
    texts = [tok.decode(o) for o in out] if tok is not None else None
    return Generation(out, batch, texts, finish, timings)


def _tokenizer_or_none(model):
    try:
        return model.tokenizer
    except LlmoptError:
        return None

"""Calibration statistics of a real model on calibration text: input Hessians and the diagonal Fisher.

- ``input_hessians``: for every linear layer, ``H = sum_x x x^T`` over the calibration tokens of the layer's input
  (GPTQ's Hessian up to a factor; its diagonal is llama.cpp's "imatrix" importance ``E[x_j**2]``). A tied output
  head's statistics are reported under the embedding's name, the tensor that is stored.
- ``fisher_diagonal``: ``sum over windows of (dL/dW)**2`` for every 2-D weight: the diagonal empirical Fisher, whose
  weighted squared error ``1/2 sum F dW**2`` estimates the loss increase a quantization error ``dW`` causes
  (second-order Taylor expansion at a minimum). Used by mixed precision to rank tensors.

Calibration text is the plays of ``llmopt.quant.texts.CALIBRATION_PLAYS`` (or a scheme's own ``calibration.texts``),
always disjoint from the evaluation texts; windows are drawn from the texts in turn.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from llmopt.quant.texts import calibration_texts


def calibration_windows(tokenizer, texts: list[str], tokens: int, window: int = 512) -> list[torch.Tensor]:
    """``tokens`` calibration tokens as BOS-prefixed windows of ``window`` tokens. Each text is cut into disjoint
    windows, taken in a spread order (bit-reversed positions: the start, the middle, the quarters, ...), and the
    texts take turns, so that any budget sees every text and all parts of each, not just the first text's opening."""
    tokenized = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in calibration_texts(tuple(texts)))
    per_text = [_spread([ids[i:i + window] for i in range(0, len(ids), window)]) for ids in tokenized]
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    windows, left = [], tokens
    for turn in range(max(map(len, per_text), default=0)):
        for pieces in per_text:
            if turn < len(pieces) and left > 0:
                piece = pieces[turn][:left]
                windows.append(torch.tensor(bos + piece))
                left -= len(piece)
    return windows


def _spread(items: list) -> list:
    """``items`` in bit-reversed index order: every prefix is spread evenly over the list."""
    bits = max(1, (len(items) - 1).bit_length())
    return [items[i] for i in sorted(range(len(items)), key=lambda i: int(f"{i:0{bits}b}"[::-1], 2))]


def _weight_names(model) -> dict[str, str]:
    """Linear module name -> the stored weight name (a tied head maps to the embedding)."""
    names = {}
    embed = model.get_input_embeddings()
    embed_name = next(n for n, p in model.named_parameters() if p is embed.weight)
    for mod_name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            names[mod_name] = embed_name if mod.weight is embed.weight else f"{mod_name}.weight"
    return names


@torch.inference_mode()
def input_hessians(model, windows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{weight name: sum x x^T}`` (float32 ``[in, in]``) of every linear layer's input over ``windows``."""
    names = _weight_names(model)
    hessians: dict[str, torch.Tensor] = {}
    handles = []

    head = model.get_output_embeddings()

    def hook(mod_name):
        def accumulate(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            h = hessians.get(names[mod_name])
            hessians[names[mod_name]] = x.T @ x if h is None else h.add_(x.T @ x)
            if module is head:  # the head is the last layer: skip its matmul, the costliest of a small model
                raise _HeadReached
        return accumulate

    for mod_name, mod in model.named_modules():
        if mod_name in names:
            handles.append(mod.register_forward_pre_hook(hook(mod_name)))
    try:
        for ids in tqdm(windows, desc="calibration (Hessians)", leave=False):
            try:
                model(ids.unsqueeze(0))
            except _HeadReached:
                pass
    finally:
        for h in handles:
            h.remove()
    return hessians


class _HeadReached(Exception):
    """Raised by the output head's hook once its input is recorded: the logits are not needed."""


def fisher_diagonal(model, windows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{weight name: sum over windows of grad**2}`` for every 2-D weight, from the next-token loss."""
    params = {n: p for n, p in model.named_parameters() if p.dim() == 2}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    try:
        for ids in tqdm(windows, desc="calibration (Fisher)", leave=False):
            logits = model(ids.unsqueeze(0)).logits[0, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits, ids[1:])
            grads = torch.autograd.grad(loss, list(params.values()))
            for (n, _), g in zip(params.items(), grads):
                fisher[n].addcmul_(g, g)
    finally:
        for p in params.values():
            p.requires_grad_(False)
    return fisher

"""The decoder: Gemma 2, Gemma 3, Qwen2.5 (and QwQ) and Qwen2.5-VL in one forward pass over backend ops.

Every op goes through ``llmopt.backends.base.Backend``, so the model never branches on device: a partition plan
maps layer ranges (and the embedding and head) to backends, and activations cross between them with
``to_host``/``from_host``. Family differences are data in ``ModelArgs`` (norm offset, sandwich norms, QK-norm,
softcaps, windows, RoPE per layer), not code paths.

    from llmopt.engine import load_model
    model = load_model("results/gemma-2-2b-it/w4g128/quant", backend="cpu")
    print(model.generate("The capital of France is", max_new_tokens=16).texts[0])

Lower level: ``prefill(ids, attention_mask) -> (logits [B, vocab], State)``, ``decode_step(state, ids [B])``,
``decode_greedy(state, ids [B]) -> next ids``, ``decode_greedy_steps(state, ids, n, stop) -> ids [B, <= n]``
(two replayed Vulkan steps in flight), ``forward_logits(ids) -> [B, T, vocab]`` (every position; for
perplexity and parity checks). Decode steps run as a recorded step where the backend offers one (CUDA graph,
replayed Vulkan step; ``model.static_decode = False`` turns that off); ``state.decode_path`` says which.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmopt.backends.base import AttnSpec, Backend
from llmopt.engine.config import ModelArgs
from llmopt.engine.rope import rope_tables
from llmopt.engine.weights import check_tensors, expected_shapes, load_tensors
from llmopt.errors import LlmoptError


@dataclass
class State:
    """Generation state of one batch: per-backend KV caches, the next cache slot, masks and positions."""

    caches: dict  # backend name -> KVCache
    start: int  # next cache slot (the same for every sequence: prompts are left-padded)
    valid: torch.Tensor  # bool [B, max_len]: slots holding real tokens
    next_pos: torch.Tensor  # int64 [B]: RoPE position of the next token of each sequence
    max_len: int
    padded: bool = False  # any sequence left-padded (else attention needs no padding mask)
    timings: dict = field(default_factory=dict)
    static: object = None  # llmopt.engine.cudagraph.StaticDecoder, when the backend asks for graph decode
    replay: object = None  # a backend's recorded decode step (VulkanBackend.replay_decoder), when it offers one
    decode_path: str | None = None  # how decode steps run, or why not replayed: set by the first decode step


class Model:
    """A loaded decoder (and vision tower, for Qwen2.5-VL) bound to one backend or a partition of several."""

    def __init__(self, args: ModelArgs, tensors: dict, folder: Path, backend: str | Backend = "cpu",
                 plan: dict | None = None, backends: dict[str, Backend] | None = None):
        self.args, self.folder = args, Path(folder)
        self.static_decode = True  # decode through a recorded step where the backend offers one (False: never)
        self._setup_devices(backend, plan, backends or {})
        t0 = time.perf_counter()
        self._upload(tensors)
        self.load_seconds = time.perf_counter() - t0
        self.vision = None
        if args.vision is not None and any(k.startswith("visual.") for k in tensors):
            from llmopt.engine.vision import VisionTower

            self.vision = VisionTower(args.vision, tensors, self.backends[self.embed_dev], self.folder)
        self._tokenizer = None

    # --- devices -------------------------------------------------------------------------------------
    def _setup_devices(self, backend, plan, backends):
        from llmopt.backends import get_backend

        n = self.args.n_layers
        given = {backend.name: backend} if isinstance(backend, Backend) else {}
        given.update(backends)
        default = backend.name if isinstance(backend, Backend) else backend
        if plan is None:
            plan = {"segments": [{"layers": [0, n - 1], "device": default}]}
        segments = plan.get("segments")
        if not isinstance(segments, list) or not segments:
            raise LlmoptError("partition plan: 'segments' must be a non-empty list")
        self.layer_dev: list[str | None] = [None] * n
        for seg in segments:
            try:
                first, last = (int(v) for v in seg["layers"])
                dev = str(seg["device"])
            except (KeyError, TypeError, ValueError):
                raise LlmoptError(f"partition plan: segment {seg!r} needs 'layers': [first, last] and 'device'") from None
            if not 0 <= first <= last < n:
                raise LlmoptError(f"partition plan: layers [{first}, {last}] outside 0..{n - 1}")
            for i in range(first, last + 1):
                if self.layer_dev[i] is not None:
                    raise LlmoptError(f"partition plan: layer {i} is assigned twice")
                self.layer_dev[i] = dev
        if None in self.layer_dev:
            raise LlmoptError(f"partition plan: layer {self.layer_dev.index(None)} has no device")
        self.embed_dev = str(plan.get("embedding") or self.layer_dev[0])
        self.head_dev = str(plan.get("head") or self.layer_dev[-1])
        self.backends: dict[str, Backend] = {}
        for dev in dict.fromkeys([self.embed_dev, *self.layer_dev, self.head_dev]):
            self.backends[dev] = given.get(dev) or get_backend(dev)

    # --- weights -------------------------------------------------------------------------------------
    def _upload(self, tensors):
        a = self.args
        check_tensors(tensors, expected_shapes(a), self.folder)
        emb = self.backends[self.embed_dev]
        self.embed = emb.embedding_table("embed_tokens.weight", tensors["embed_tokens.weight"])
        head = self.backends[self.head_dev]
        self.final_norm = head.param("norm.weight", tensors["norm.weight"])
        head_name = "embed_tokens.weight" if a.tie_embeddings else "lm_head.weight"
        self.head = head.linear_weight("lm_head.weight", tensors[head_name])
        self.layers = []
        for i in range(a.n_layers):
            be = self.backends[self.layer_dev[i]]
            p = f"layers.{i}."

            def lin(name, bias=False):
                b = tensors.get(p + name + ".bias") if bias else None
                return be.linear_weight(p + name + ".weight", tensors[p + name + ".weight"], b)

            def norm(name):
                return be.param(p + name + ".weight", tensors[p + name + ".weight"])

            layer = {
                "q": lin("self_attn.q_proj", a.qkv_bias), "k": lin("self_attn.k_proj", a.qkv_bias),
                "v": lin("self_attn.v_proj", a.qkv_bias), "o": lin("self_attn.o_proj"),
                "gate": lin("mlp.gate_proj"), "up": lin("mlp.up_proj"), "down": lin("mlp.down_proj"),
                "attn_norm": norm("input_layernorm"),
            }
            if a.sandwich_norm:  # Gemma: post-attention norm, then a separate pre-FFN norm
                layer["post_attn_norm"] = norm("post_attention_layernorm")
                layer["ffn_norm"] = norm("pre_feedforward_layernorm")
                layer["post_ffn_norm"] = norm("post_feedforward_layernorm")
            else:  # Qwen: "post_attention_layernorm" is the pre-FFN norm
                layer["ffn_norm"] = norm("post_attention_layernorm")
            if a.qk_norm:
                layer["q_norm"] = norm("self_attn.q_norm")
                layer["k_norm"] = norm("self_attn.k_norm")
            self.layers.append(layer)
        self.specs = [AttnSpec(a.n_heads, a.n_kv_heads, a.head_dim, a.attn_scale, a.windows[i], a.attn_softcap)
                      for i in range(a.n_layers)]
        # KV caches are per backend; a layer indexes its backend's cache by its local number.
        self.local_index, counts = [], {}
        for dev in self.layer_dev:
            self.local_index.append(counts.get(dev, 0))
            counts[dev] = counts.get(dev, 0) + 1

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from llmopt.engine.tokenizer import Tokenizer

            self._tokenizer = Tokenizer(self.folder, self.args)
        return self._tokenizer

    # --- forward -------------------------------------------------------------------------------------
    def new_state(self, batch: int, max_len: int) -> State:
        a = self.args
        if max_len > a.max_position:
            raise LlmoptError(f"{self.folder}: {max_len} tokens exceed the model context of {a.max_position} "
                              f"(max_position_embeddings)")
        caches = {}
        for dev, be in self.backends.items():
            layers = [i for i in range(a.n_layers) if self.layer_dev[i] == dev]
            if layers:
                caches[dev] = be.kv_cache(len(layers), batch, max_len, a.n_kv_heads, a.head_dim,
                                          [a.windows[i] for i in layers])
        return State(caches, 0, torch.zeros(batch, max_len, dtype=torch.bool), torch.zeros(batch, dtype=torch.int64),
                     max_len)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, state: State, all_logits: bool = False,
                 embeds: dict | None = None) -> torch.Tensor:
        """Run ``ids [B, T]`` at cache slots ``state.start..``; host float32 logits (last or all positions)."""
        a = self.args
        B, T = ids.shape
        if state.start + T > state.max_len:
            raise LlmoptError(f"{state.start + T} tokens exceed the KV cache of {state.max_len} tokens")
        cur = self.backends[self.embed_dev]
        x, normed = self._embed(cur, ids, self.layer_dev[0] == self.embed_dev, embeds)
        valid = state.valid[:, :state.start + T] if state.padded else None
        tables = {r: rope_tables(r, positions, a.head_dim) for r in set(a.rope_layers)}
        x = self._stack(x, cur, tables, state, valid, normed=normed)
        head = self.backends[self.head_dev]
        if not all_logits:
            return head.logits(x, self.head, a.final_softcap)
        y = head.to_host(head.linear(x, self.head))
        return a.final_softcap * torch.tanh(y / a.final_softcap) if a.final_softcap else y

    def _embed(self, be: Backend, ids, first_here: bool, embeds: dict | None = None) -> tuple:
        """``(x, normed)``: the embeddings of ``ids`` on ``be`` (image ``embeds`` in place of their placeholder
        tokens) and, where the first block runs on ``be`` too (``first_here``) and a backend offers
        ``embedding_rmsnorm``, that block's attention norm of them from the same op (else None)."""
        a = self.args
        fused = getattr(be, "embedding_rmsnorm", None)
        if first_here and embeds is None and fused is not None:
            return fused(ids, self.embed, a.embed_scale, self.layers[0]["attn_norm"], a.norm_eps, a.norm_unit_offset)
        x = be.embedding(ids, self.embed, a.embed_scale)
        if embeds is not None:  # image features replace the placeholder tokens' embeddings
            host = be.to_host(x)
            host[embeds["mask"]] = embeds["features"].to(host.dtype)
            x = be.from_host(host)
        return x, None

    def _stack(self, x, cur: Backend, tables: dict, state: State, valid, ops: Backend | None = None, normed=None):
        """Every block on ``x`` (held by backend ``cur``), then the final norm: the head's input, on the head's
        backend. Each residual add is fused with the norm after it where both run on one backend, so an eager pass
        and a recorded step (``ops``: one backend's recording view standing in for every device: the CUDA graph,
        the replayed Vulkan step) run the same kernels. ``tables``: RoPE tables by RoPE kind; ``normed``: the first
        block's attention norm of ``x``, done (``_embed``)."""
        a = self.args
        for i, layer in enumerate(self.layers):
            be = ops or self.backends[self.layer_dev[i]]
            if be is not cur:
                x, cur = be.from_host(cur.to_host(x)), be
            last = i + 1 == len(self.layers)
            after = ops or self.backends[self.head_dev if last else self.layer_dev[i + 1]]
            next_norm = (self.final_norm if last else self.layers[i + 1]["attn_norm"]) if after is be else None
            out = self._block(be, layer, x, tables[a.rope_layers[i]], state, i, valid, normed, next_norm)
            x, normed = out if next_norm is not None else (out, None)
        if normed is not None:
            return normed
        head = ops or self.backends[self.head_dev]
        if head is not cur:
            x = head.from_host(cur.to_host(x))
        return head.rmsnorm(x, self.final_norm, a.norm_eps, a.norm_unit_offset)

    def _block(self, be: Backend, w: dict, x, rope, state: State, i: int, valid, normed=None, next_norm=None):
        """Layer ``i`` on ``x``. ``next_norm`` (the next norm's weight) fuses the final residual add with that norm
        and returns ``(x, its norm)``, which the next block takes as ``normed`` (its attention norm, done)."""
        a, spec = self.args, self.specs[i]
        h = normed if normed is not None else be.rmsnorm(x, w["attn_norm"], a.norm_eps, a.norm_unit_offset)
        q, k, v = _linears(be, h, (w["q"], w["k"], w["v"]))
        if a.qk_norm:
            q = be.rmsnorm(q, w["q_norm"], a.norm_eps, a.norm_unit_offset, group=a.head_dim)
            k = be.rmsnorm(k, w["k_norm"], a.norm_eps, a.norm_unit_offset, group=a.head_dim)
        cache = state.caches[self.layer_dev[i]]
        attn = _rope_attention(be, q, k, v, rope, a.head_dim, cache, self.local_index[i], state.start, valid, spec)
        post = w["post_attn_norm"] if a.sandwich_norm else None
        x, h = _linear_add_rmsnorm(be, attn, w["o"], x, w["ffn_norm"], a.norm_eps, a.norm_unit_offset, post)
        h = _gated_linears(be, h, w["gate"], w["up"], a.act)
        post = w["post_ffn_norm"] if a.sandwich_norm else None
        if next_norm is not None:
            return _linear_add_rmsnorm(be, h, w["down"], x, next_norm, a.norm_eps, a.norm_unit_offset, post)
        h = be.linear(h, w["down"])
        return be.add(x, h if post is None else be.rmsnorm(h, post, a.norm_eps, a.norm_unit_offset))

    # --- public steps --------------------------------------------------------------------------------
    def prefill(self, ids, attention_mask: torch.Tensor | None = None, max_len: int | None = None,
                images: list | None = None, all_logits: bool = False) -> tuple[torch.Tensor, State]:
        """Process left-padded prompts ``ids [B, T]`` (``attention_mask`` 1 = real token).

        Returns the last position's logits ``[B, vocab]`` (``[B, T, vocab]`` with ``all_logits``) and the state
        for ``decode_step``. ``max_len`` sizes the KV cache (default: the prompt). ``images``: preprocessed
        ``llmopt.engine.vision.ImageInput`` list, in the order of the prompt's image placeholders."""
        ids = torch.as_tensor(ids, dtype=torch.int64)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        B, T = ids.shape
        if T == 0:
            raise LlmoptError("prefill: the prompt is empty")
        mask = torch.ones(B, T, dtype=torch.bool) if attention_mask is None else torch.as_tensor(attention_mask).bool()
        if mask.shape != ids.shape:
            raise LlmoptError(f"prefill: attention_mask shape {list(mask.shape)} differs from ids {list(ids.shape)}")
        if int(ids.max()) >= self.args.vocab_size or int(ids.min()) < 0:
            raise LlmoptError(f"prefill: token ids must lie in 0..{self.args.vocab_size - 1}")
        max_len = max_len or T
        if T > self.args.max_position:
            raise LlmoptError(f"prompt of {T} tokens is longer than the model context of {self.args.max_position}")
        state = self.new_state(B, max_len)
        state.valid[:, :T] = mask
        state.padded = not bool(mask.all())
        embeds = None
        if images:
            positions, embeds = self._image_inputs(ids, mask, images)
        else:
            if self._has_image_tokens(ids):
                raise LlmoptError("prefill: the prompt holds image placeholder tokens but no images were given")
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        state.next_pos = positions.reshape(-1, B, T).amax(dim=(0, 2)) + 1
        t0 = time.perf_counter()
        logits = self._forward(ids, positions, state, all_logits, embeds)
        state.timings["prefill_s"] = time.perf_counter() - t0
        state.start = T
        return logits, state

    def decode_step(self, state: State, ids) -> torch.Tensor:
        """Append one token per sequence (``ids [B]``) and return the next logits ``[B, vocab]``.

        A backend with ``cuda_graphs`` set runs the whole model's unpadded decode as one captured CUDA graph; one
        with ``replay_decoder`` (Vulkan) records the step once and replays it (``state.decode_path`` says which)."""
        if self._replayed(state):
            return state.replay.step(state, ids)
        if state.static is None and self.static_decode and not state.padded and len(self.backends) == 1 and \
                getattr(next(iter(self.backends.values())), "cuda_graphs", False):
            from llmopt.engine.cudagraph import StaticDecoder

            state.static, state.decode_path = StaticDecoder(self, state), "cuda graph"
        if state.static is not None:
            return state.static.step(torch.as_tensor(ids, dtype=torch.int64)).to("cpu", torch.float32)
        ids = torch.as_tensor(ids, dtype=torch.int64).view(-1, 1)
        state.valid[:, state.start] = True
        positions = state.next_pos.view(-1, 1)
        logits = self._forward(ids, positions, state)
        state.start += 1
        state.next_pos = state.next_pos + 1
        return logits

    def decode_greedy(self, state: State, ids) -> torch.Tensor:
        """``decode_step`` followed by argmax: the greedy next ids ``[B]`` (int64). On a replayed Vulkan step the
        argmax runs on the device and only the ids come back."""
        if self._replayed(state):
            return state.replay.step(state, ids, greedy=True)
        return self.decode_step(state, ids).argmax(dim=-1)

    def decode_greedy_steps(self, state: State, ids, n: int, stop=None) -> torch.Tensor:
        """Up to ``n`` ``decode_greedy`` steps from ``ids [B]``, each fed the ids before: int64 ``[B, k]``, k <= n.
        ``stop``: ``stop(ids [B]) -> bool`` sees each step's ids in order, True ends after that step; or stop ids
        (end once every sequence has produced one). On a replayed Vulkan step two steps are in flight
        (``VulkanDecoder.greedy_steps``); the tokens and state are the same."""
        if stop is not None and not callable(stop):
            stop_ids = torch.tensor(sorted({int(t) for t in stop}), dtype=torch.int64)
            stopped = torch.zeros(state.valid.shape[0], dtype=torch.bool)

            def stop(step_ids) -> bool:
                return bool(stopped.logical_or_(torch.isin(step_ids, stop_ids)).all())
        if self._replayed(state):
            return state.replay.greedy_steps(state, ids, n, stop)
        out = []
        for _ in range(n):
            ids = self.decode_greedy(state, ids)
            out.append(ids)
            if stop is not None and stop(ids):
                break
        return torch.stack(out, dim=1) if out else torch.zeros(int(state.valid.shape[0]), 0, dtype=torch.int64)

    def _replayed(self, state: State) -> bool:
        """Whether this state decodes through a backend's recorded step; decided (with the reason) at its first step."""
        if state.decode_path is None:
            state.decode_path = "eager"
            recorder = getattr(next(iter(self.backends.values())), "replay_decoder", None)
            if not self.static_decode:
                state.decode_path = "eager: Model.static_decode is off"
            elif len(self.backends) > 1 and any(hasattr(be, "replay_decoder") for be in self.backends.values()):
                state.decode_path = f"eager: the plan spans backends {sorted(self.backends)}, a replayed step needs one"
            elif recorder is not None:
                try:
                    state.replay, state.decode_path = recorder(self, state), "replayed"
                except LlmoptError as err:
                    state.decode_path = f"eager: {err}"
        return state.replay is not None

    def forward_logits(self, ids, attention_mask: torch.Tensor | None = None, images: list | None = None) -> torch.Tensor:
        """Logits at every position, host float32 ``[B, T, vocab]`` (fresh cache, one prefill pass)."""
        return self.prefill(ids, attention_mask, images=images, all_logits=True)[0]

    def generate(self, prompt, max_new_tokens: int = 64, **kwargs):
        """Generate from text, token ids or a batch of either; see ``llmopt.engine.generate.generate``."""
        from llmopt.engine.generate import generate

        return generate(self, prompt, max_new_tokens=max_new_tokens, **kwargs)

    # --- images (Qwen2.5-VL) -------------------------------------------------------------------------
    def _has_image_tokens(self, ids) -> bool:
        return self.args.image_token_id is not None and bool((ids == self.args.image_token_id).any())

    def _image_inputs(self, ids, mask, images):
        if self.args.vision is None:
            raise LlmoptError(f"{self.folder}: model_type {self.args.family} takes no images (text-only model)")
        if self.vision is None:
            raise LlmoptError(f"{self.folder}: the checkpoint has no vision tower tensors ('visual.*')")
        from llmopt.engine.vision import mrope_positions

        features = torch.cat([self.vision(img) for img in images], dim=0)
        image_mask = (ids == self.args.image_token_id) & mask
        if int(image_mask.sum()) != features.shape[0]:
            raise LlmoptError(f"prefill: the prompt has {int(image_mask.sum())} image placeholder tokens but the "
                              f"images give {features.shape[0]} features")
        positions = mrope_positions(ids, mask, images, self.args)
        return positions, {"mask": image_mask, "features": features}


def _linears(be: Backend, x, weights: tuple) -> tuple:
    """Several projections of one input; a backend offering ``linears`` may run them as one fused matmul."""
    fused = getattr(be, "linears", None)
    return fused(x, weights) if fused is not None else tuple(be.linear(x, w) for w in weights)


def _rope_attention(be: Backend, q, k, v, rope: tuple, head_dim: int, cache, layer: int, start: int, valid, spec):
    """RoPE on q and k, then attention; a backend offering ``rope_attention`` may do both (and its KV store) in one op."""
    fused = getattr(be, "rope_attention", None)
    if fused is not None:
        return fused(q, k, v, *rope, head_dim, cache, layer, start, valid, spec)
    q, k = be.rope(q, *rope, head_dim), be.rope(k, *rope, head_dim)
    return be.attention(q, k, v, cache, layer, start, valid, spec)


def _gated_linears(be: Backend, x, gate, up, kind: str):
    """``act(x gate^T) * (x up^T)``; a backend offering ``gated_linears`` may apply the activation inside the matmul."""
    fused = getattr(be, "gated_linears", None)
    return fused(x, gate, up, kind) if fused is not None else be.gated_act(*_linears(be, x, (gate, up)), kind)


def _linear_add_rmsnorm(be: Backend, x, weight, residual, norm, eps: float, unit_offset: bool, post=None) -> tuple:
    """``_add_rmsnorm(be, residual, x weight^T, norm, ...)``; a backend offering ``linear_add_rmsnorm`` may do the
    projection, the residual add and the norm in one op (plain pre-norms: no ``post``), and one offering
    ``linear_norm_add_rmsnorm`` also Gemma's sandwich ``post`` norm."""
    if post is None and getattr(be, "linear_add_rmsnorm", None) is not None:
        return be.linear_add_rmsnorm(x, weight, residual, norm, eps, unit_offset)
    if post is not None and getattr(be, "linear_norm_add_rmsnorm", None) is not None:
        return be.linear_norm_add_rmsnorm(x, weight, residual, post, norm, eps, unit_offset)
    return _add_rmsnorm(be, residual, be.linear(x, weight), norm, eps, unit_offset, post)


def _add_rmsnorm(be: Backend, x, h, weight, eps: float, unit_offset: bool, post=None) -> tuple:
    """The residual ``x + h`` and its RMSNorm; a backend offering ``add_rmsnorm`` does both in one op. ``post``
    (Gemma's sandwich norms): ``h`` is first normed with that weight; a backend offering ``norm_add_rmsnorm`` does
    the three in one op."""
    fused = getattr(be, "norm_add_rmsnorm", None) if post is not None else None
    if fused is not None:
        return fused(x, h, post, weight, eps, unit_offset)
    if post is not None:
        h = be.rmsnorm(h, post, eps, unit_offset)
    fused = getattr(be, "add_rmsnorm", None)
    if fused is not None:
        return fused(x, h, weight, eps, unit_offset)
    x = be.add(x, h)
    return x, be.rmsnorm(x, weight, eps, unit_offset)


def load_model(folder: str | Path, backend: str | Backend = "cpu", plan: dict | None = None,
               backends: dict[str, Backend] | None = None) -> Model:
    """Load a model folder (config.json + float or packed safetensors) onto ``backend`` or a partition ``plan``.

    ``plan`` device names are built with ``llmopt.backends.get_backend`` unless ``backends`` (or ``backend``, when
    it is an instance) supplies a configured instance for that name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LlmoptError(f"{folder}: not a model folder (directory not found)")
    args = ModelArgs.from_folder(folder)
    return Model(args, load_tensors(folder), folder, backend, plan, backends)

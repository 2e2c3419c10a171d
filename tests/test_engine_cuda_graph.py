"""Static decode step (``llmopt.engine.cudagraph``): same logits as ``Model.decode_step``, eagerly on CPU here, and
as a captured CUDA graph against the CPU reference where a GPU is present (skipped with the probe's reason)."""

from pathlib import Path

import pytest
import torch

from llmopt.backends.cpu import CpuBackend
from llmopt.backends.cuda import probe
from llmopt.engine.config import ModelArgs
from llmopt.engine.cudagraph import StaticDecoder
from llmopt.engine.model import Model
from llmopt.engine.weights import expected_shapes
from llmopt.errors import LlmoptError
from llmopt.quant.format import QuantizedTensor

BASE = {"hidden_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 256, "vocab_size": 300, "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False}
CONFIGS = {
    "qwen2": {**BASE, "model_type": "qwen2", "rope_theta": 1e6, "hidden_act": "silu"},
    "gemma2": {**BASE, "model_type": "gemma2", "head_dim": 32, "sliding_window": 6, "attn_logit_softcapping": 50.0,
               "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 32, "hidden_activation": "gelu_pytorch_tanh"},
}


def tensors(args, quantized=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in expected_shapes(args).items():
        if quantized and len(shape) == 2:
            n, k = shape
            q = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
            s = (torch.rand(n, k // 128, generator=g) * 0.2 / k ** 0.5).half()
            out[name] = QuantizedTensor(q, s, None, 4, 128, (n, k))
        else:
            out[name] = torch.randn(shape, generator=g) * (0.3 if len(shape) == 2 else 0.1)
    return out


def decode_both(model, ids, steps, graph=None, eager_model=None):
    """Logits of ``steps`` decode steps through StaticDecoder and through Model.decode_step, same tokens."""
    eager_model = eager_model or model
    _, s1 = model.prefill(ids, max_len=ids.shape[1] + steps)
    _, s2 = eager_model.prefill(ids, max_len=ids.shape[1] + steps)
    dec = StaticDecoder(model, s1, graph=graph)
    g = torch.Generator().manual_seed(3)
    got, want = [], []
    for _ in range(steps):
        tok = torch.randint(0, model.args.vocab_size, (ids.shape[0],), generator=g)
        got.append(dec.step(tok).cpu().clone())
        want.append(eager_model.decode_step(s2, tok))
    assert s1.start == s2.start and torch.equal(s1.next_pos, s2.next_pos)
    return torch.stack(got), torch.stack(want)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_static_step_matches_decode_step_on_cpu(family):
    args = ModelArgs.from_hf(CONFIGS[family])
    model = Model(args, tensors(args), Path(family), backend=CpuBackend(quant="reference"))
    ids = torch.randint(0, args.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))
    got, want = decode_both(model, ids, steps=9)  # 14 tokens: gemma2's 6-slot ring wraps twice
    # float32 throughout; only the reduction order differs (masked full cache vs sliced cache): 1e-5 relative
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_static_step_refuses_padding_and_graph_on_cpu():
    args = ModelArgs.from_hf(CONFIGS["qwen2"])
    model = Model(args, tensors(args), Path("qwen2"), backend=CpuBackend(quant="reference"))
    _, state = model.prefill(torch.tensor([[0, 5, 6]]), torch.tensor([[0, 1, 1]]), max_len=8)
    with pytest.raises(LlmoptError, match="left-padded"):
        StaticDecoder(model, state)
    _, state = model.prefill(torch.tensor([[4, 5, 6]]), max_len=4)
    with pytest.raises(LlmoptError, match="CUDA graphs need a CUDA device"):
        StaticDecoder(model, state, graph=True)
    dec = StaticDecoder(model, state)
    dec.step(torch.tensor([1]))
    with pytest.raises(LlmoptError, match="exceed the KV cache"):
        dec.step(torch.tensor([1]))


class GraphFlagCpu(CpuBackend):
    """A CPU backend asking for the static decode step, as CudaBackend does (eager here: no CUDA device)."""

    cuda_graphs = True


def test_decode_step_dispatches_to_static_step_when_the_backend_asks():
    args = ModelArgs.from_hf(CONFIGS["gemma2"])
    t = tensors(args)
    flagged = Model(args, t, Path("gemma2"), backend=GraphFlagCpu(quant="reference"))
    plain = Model(args, t, Path("gemma2"), backend=CpuBackend(quant="reference"))
    prompt = [5, 6, 7, 8]
    a = flagged.generate(prompt, max_new_tokens=10, stop_ids=[])
    b = plain.generate(prompt, max_new_tokens=10, stop_ids=[])
    assert a.tokens == b.tokens
    _, state = flagged.prefill(torch.tensor([prompt]), max_len=8)
    flagged.decode_step(state, torch.tensor([3]))
    assert isinstance(state.static, StaticDecoder)
    # a left-padded batch keeps the per-op path (padding masks are not static), with the same results
    batch = [[9, 10, 11], prompt]
    a = flagged.generate(batch, max_new_tokens=6, stop_ids=[])
    b = plain.generate(batch, max_new_tokens=6, stop_ids=[])
    assert a.tokens == b.tokens


def test_static_step_refuses_a_partitioned_model():
    args = ModelArgs.from_hf(CONFIGS["qwen2"])
    plan = {"segments": [{"layers": [0, 1], "device": "cpu"}, {"layers": [2, 2], "device": "cpu_b"}]}
    model = Model(args, tensors(args), Path("qwen2"), backend="cpu", plan=plan,
                  backends={"cpu": CpuBackend(quant="reference"), "cpu_b": CpuBackend(quant="reference")})
    _, state = model.prefill(torch.tensor([[1, 2, 3]]), max_len=6)
    with pytest.raises(LlmoptError, match="one backend"):
        StaticDecoder(model, state)


@pytest.mark.skipif(not probe()["present"], reason=probe()["reason"])
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_cuda_graph_decode_matches_cpu_reference(family):
    from llmopt.backends.cuda import CudaBackend

    args = ModelArgs.from_hf(CONFIGS[family])
    t = tensors(args, quantized=True)
    gpu = Model(args, t, Path(family), backend=CudaBackend())  # graph + fused q/k/v and gate/up
    cpu = Model(args, t, Path(family), backend=CpuBackend(quant="reference"))
    ids = torch.randint(0, args.vocab_size, (1, 5), generator=torch.Generator().manual_seed(1))
    got, want = decode_both(gpu, ids, steps=9, graph=True, eager_model=cpu)
    # bf16 kernel input on the GPU against float32 dequantized weights: 2e-2 relative, as bench/engine_cuda.py
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()
    # greedy through Model.decode_step (graph, fused) vs the per-op CUDA path (same bf16 kernel numerics)
    eager = Model(args, t, Path(family), backend=CudaBackend(cuda_graphs=False, fuse_linears=False))
    a = gpu.generate(ids[0].tolist(), max_new_tokens=12, stop_ids=[]).tokens[0]
    b = eager.generate(ids[0].tolist(), max_new_tokens=12, stop_ids=[]).tokens[0]
    assert a == b

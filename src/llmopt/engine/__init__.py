"""The inference engine: one decoder for Gemma 2/3, Qwen2.5 (QwQ) and Qwen2.5-VL over pluggable backends.

    from llmopt.engine import load_model
    model = load_model(folder, backend="cpu")          # or plan=partition_plan_dict
    out = model.generate("Hello", max_new_tokens=32)   # out.texts, out.tokens, out.timings

Modules: config (ModelArgs from config.json), weights (safetensors, canonical names, shape checks), rope,
model (the forward pass, prefill/decode), vision (Qwen2.5-VL tower, image preprocessing), sampling,
tokenizer (tokenizer and chat template of the model folder), generate (batched generation loop).
"""

from llmopt.engine.config import ModelArgs
from llmopt.engine.model import Model, State, load_model

__all__ = ["ModelArgs", "Model", "State", "load_model"]

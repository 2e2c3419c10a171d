"""Baselines measured in the same run as our engine, with the same prompt/decode lengths and prompt ids.

- ``hf``: Hugging Face transformers on the float source folder (``AutoModelForCausalLM``; the multimodal
  families through ``AutoModelForImageTextToText``), prefill then greedy decode with its KV cache, on the CPU
  (or the CUDA device for target ``cuda``).
- ``llama.cpp``: llama-cpp-python on the model's GGUF, where one exists (the real Gemma 3 270M ships one), with
  the same thread count as torch; all layers on the GPU for target ``cuda`` when the build has CUDA.

Each returns the same timing dict as ``measure.time_engine`` or raises LlmoptError saying why it cannot run.
``hf_once`` / ``llama_cpp_once`` time one run of a loaded model (bench/engine_cpu.py interleaves them with
``measure.engine_once``).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from llmopt.bench.measure import prompt_ids, time_runs
from llmopt.errors import LlmoptError
from llmopt.fsutil import read_json


def _load_hf(source_dir: Path, dtype: torch.dtype, device: str):
    import transformers

    errors = []
    for auto in ("AutoModelForCausalLM", "AutoModelForImageTextToText"):
        try:
            model = getattr(transformers, auto).from_pretrained(str(source_dir), dtype=dtype)
            return model.to(device).eval()
        except (ValueError, KeyError, OSError) as err:
            errors.append(f"{auto}: {str(err).splitlines()[0]}")
    raise LlmoptError(f"{source_dir}: transformers cannot load it ({'; '.join(errors)})")


def hf_once(model, ids: torch.Tensor, gen: int, sync=lambda: None) -> tuple[float, float]:
    """One transformers run: prefill ``ids`` [batch, prompt] and take the greedy token, then ``gen`` decode steps
    with the model's own KV cache; ``sync`` waits for the device."""
    with torch.inference_mode():
        sync()
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
        t1 = time.perf_counter()
        cache = out.cache  # transformers 5 names the KV cache `cache` (past_key_values is deprecated)
        for _ in range(gen):
            out = model(input_ids=tok, cache=cache, use_cache=True)
            cache = out.cache
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
        return t1 - t0, time.perf_counter() - t1


def hf_baseline(source_dir: Path, prompt: int, gen: int, batch: int, warmup: int, repeats: int,
                device: str = "cpu", dtype: str = "float32") -> dict:
    """Transformers, float weights, eager, prefill + greedy decode with the model's own KV cache."""
    import transformers

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    model = _load_hf(source_dir, torch_dtype, device)
    ids = prompt_ids(model.config.get_text_config().vocab_size, batch, prompt).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    timing = time_runs(lambda: hf_once(model, ids, gen, sync), batch, prompt, gen, warmup, repeats)
    return {"name": "hf", "engine": f"transformers {transformers.__version__} eager {dtype} on {device}", **timing}


def find_gguf(source_dir: Path) -> Path | None:
    """The model's GGUF: a ``*.gguf`` in the source folder, or the pip package's for ``source: pip-gguf``."""
    found = sorted(Path(source_dir).glob("*.gguf"))
    if found:
        return found[0]
    manifest = Path(source_dir) / "manifest.json"
    if manifest.is_file() and read_json(manifest).get("source") == "pip-gguf":
        from llmopt.download.pip_gguf import assemble_gguf

        return assemble_gguf()
    return None


def llama_cpp_baseline(gguf: Path, prompt: int, gen: int, warmup: int, repeats: int, device: str = "cpu",
                       timeout: float = 1800.0) -> dict:
    """llama.cpp in a child process, so a native crash cannot take the benchmark down with it.

    A build whose repacked CPU kernels use instructions the machine traps (this VM advertises AMX but SIGILLs on
    ``tileloadd``) is retried once with llama.cpp's extra buffer types off (``use_extra_bufts``: plain ggml
    kernels, no weight repacking); the record says so."""
    import json
    import signal
    import subprocess
    import sys

    notes = []
    for extra_bufts in (1, 0):
        cmd = [sys.executable, "-m", "llmopt.bench.baselines", str(gguf), str(prompt), str(gen), str(warmup),
               str(repeats), device, str(torch.get_num_threads()), str(extra_bufts)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise LlmoptError(f"llama.cpp baseline: no result within {timeout:.0f} s") from None
        if proc.returncode == 0:
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            if notes:
                result["engine"] += f"; {'; '.join(notes)}, retried with extra buffer types (repacking) off"
            return result
        if proc.returncode < 0:
            name = signal.Signals(-proc.returncode).name
            notes.append(f"default build crashed with {name}")
            if name == "SIGILL" and extra_bufts:
                continue
            raise LlmoptError(f"llama.cpp baseline crashed with {name}" + (
                " (the llama-cpp-python build uses instructions this CPU or VM does not execute; rebuild it with "
                "CMAKE_ARGS=-DGGML_NATIVE=OFF)" if name == "SIGILL" else ""))
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise LlmoptError(f"llama.cpp baseline failed (exit {proc.returncode}): {tail}")
    raise LlmoptError("llama.cpp baseline: " + "; ".join(notes))


def open_llama_cpp(gguf: Path, n_ctx: int, n_batch: int, threads: int, device: str = "cpu",
                   extra_bufts: bool = True, **options):
    """``llama_cpp.Llama`` on ``gguf`` with ``threads`` threads for prompt and decode alike, all layers on the GPU
    for ``device="cuda"``, ``options`` passed on (``logits_all``, ``n_ubatch``, ...); ``extra_bufts=False`` turns
    off ggml's extra buffer types (AMX and the AVX-512 weight repack), which ``Llama()`` has no keyword for: its
    model params come from ``llama_model_default_params``, patched for the call."""
    try:
        import llama_cpp
        import llama_cpp.llama_cpp as capi
    except ImportError:
        raise LlmoptError("llama-cpp-python is not installed (pip install llama-cpp-python)") from None
    default_params = capi.llama_model_default_params

    def params():
        p = default_params()
        p.use_extra_bufts = extra_bufts
        return p

    capi.llama_model_default_params = params
    try:
        return llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=n_batch, n_threads=threads,
                               n_threads_batch=threads, n_gpu_layers=-1 if device == "cuda" else 0, verbose=False,
                               **options)
    finally:
        capi.llama_model_default_params = default_params


def llama_cpp_once(llm, ids: list[int], gen: int) -> tuple[float, float]:
    """One llama.cpp run, batch 1: ``eval`` of the prompt (pp) and the greedy token on the last position's logits,
    then ``gen`` tokens one at a time (tg)."""
    import llama_cpp.llama_cpp as capi
    import numpy as np

    n_vocab = llm.n_vocab()

    def next_token() -> int:
        return int(np.argmax(np.ctypeslib.as_array(capi.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))))

    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    tok = next_token()
    t1 = time.perf_counter()
    for _ in range(gen):
        llm.eval([tok])
        tok = next_token()
    return t1 - t0, time.perf_counter() - t1


def _llama_cpp_run(gguf: Path, prompt: int, gen: int, warmup: int, repeats: int, device: str, threads: int,
                   extra_bufts: bool) -> dict:
    """The child process's work: open the GGUF, time ``llama_cpp_once`` on fixed prompt ids."""
    llm = open_llama_cpp(gguf, prompt + gen + 8, max(prompt, 8), threads, device, extra_bufts)
    import llama_cpp

    ids = prompt_ids(llm.n_vocab(), 1, prompt)[0].tolist()
    timing = time_runs(lambda: llama_cpp_once(llm, ids, gen), 1, prompt, gen, warmup, repeats)
    return {"name": "llama.cpp", "engine": f"llama-cpp-python {llama_cpp.__version__} ({gguf.name}, {threads} "
            f"threads, {'GPU' if device == 'cuda' else 'CPU'})", **timing}


if __name__ == "__main__":  # the child process of llama_cpp_baseline
    import json
    import sys

    g, p, n, w, r, dev, th, extra = sys.argv[1:9]
    print(json.dumps(_llama_cpp_run(Path(g), int(p), int(n), int(w), int(r), dev, int(th), extra == "1")))

"""Measuring one loaded model: the correctness check, prefill/decode timing and peak memory.

Timing follows llama-bench's definitions so the numbers compare with llama.cpp's: prefill tok/s = batch x prompt
tokens / prefill wall time (pp512), decode tok/s = batch x decode steps / their wall time (tg128), TTFT = wall
time from the prompt to the first sampled token. Each configuration runs ``warmup`` untimed passes, then
``repeats`` timed ones; we keep every sample and report the median with min/max and the relative spread.
"""

from __future__ import annotations

import statistics
import threading
import time

import torch

from llmopt.errors import LlmoptError


class PeakMemory:
    """Samples this process's RSS every ``interval`` seconds in a thread; ``peak`` is the highest seen.
    On CUDA, ``torch.cuda.max_memory_allocated`` is reported too."""

    def __init__(self, interval: float = 0.005):
        import psutil

        self.proc, self.interval = psutil.Process(), interval
        self.start_rss = self.proc.memory_info().rss
        self.peak = self.start_rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    def result(self) -> dict:
        out = {"peak_rss_bytes": self.peak, "peak_rss_delta_bytes": self.peak - self.start_rss}
        if torch.cuda.is_available():
            out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        return out


def stats(samples: list[float]) -> dict:
    """Median, min, max and relative spread ((max - min) / median) of a list of samples."""
    med = statistics.median(samples)
    return {"median": med, "min": min(samples), "max": max(samples),
            "spread": (max(samples) - min(samples)) / med if med else 0.0, "n": len(samples), "samples": samples}


def prompt_ids(vocab: int, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Fixed pseudo-random token ids (speed does not depend on the text), avoiding the low special ids."""
    g = torch.Generator().manual_seed(seed)
    low = min(8, vocab - 1)
    return torch.randint(low, vocab, (batch, length), generator=g)


def check_correctness(model, reference, vocab: int, tokens: int = 32, decode_steps: int = 8, tol: float = 2e-2,
                      seed: int = 1) -> dict:
    """Compare ``model`` against ``reference`` (the CPU float backend on the same weights).

    Prefill of ``tokens - decode_steps`` tokens then ``decode_steps`` teacher-forced decode steps on ``model``,
    against the reference's logits at every position from one pass, so both the prefill (GEMM) and the decode
    (GEMV, KV cache) paths are checked. Passes when every logit is finite and the relative L2 error of each
    position's logits is at most ``tol``; the top-1 agreement is reported beside it."""
    ids = prompt_ids(vocab, 1, tokens, seed)
    ref = reference.forward_logits(ids)[0]  # [T, vocab]
    n_pre = tokens - decode_steps
    logits, state = model.prefill(ids[:, :n_pre], max_len=tokens)
    got = [logits[0]]
    for t in range(n_pre, tokens):
        got.append(model.decode_step(state, ids[:, t])[0])
    got = torch.stack(got).float()
    want = ref[n_pre - 1:].float()
    finite = bool(torch.isfinite(got).all())
    rel = ((got - want).norm(dim=-1) / want.norm(dim=-1).clamp_min(1e-12))
    top1 = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    worst = float(rel.max()) if finite else float("inf")
    return {"passed": finite and worst <= tol, "max_rel_err": worst, "mean_rel_err": float(rel.mean()),
            "max_abs_err": float((got - want).abs().max()) if finite else float("inf"), "top1_agreement": top1,
            "finite": finite, "tolerance": tol, "positions": int(got.shape[0]),
            "method": f"prefill {n_pre} + {decode_steps} decode steps vs reference forward_logits, relative L2 "
                      f"per position"}


def _sync(model) -> None:
    for be in model.backends.values():
        be.synchronize()


def time_runs(run_once, batch: int, prompt: int, gen: int, warmup: int, repeats: int, progress=None) -> dict:
    """Call ``run_once() -> (prefill_s, decode_s)`` ``warmup`` untimed and ``repeats`` timed times: the seconds
    from the prompt to the first sampled token, then the seconds of ``gen`` greedy decode steps. Our engine and
    both baselines are timed through this, so their numbers share one definition."""
    pre, dec, ttft = [], [], []
    for run in range(warmup + repeats):
        prefill_s, decode_s = run_once()
        if run >= warmup:
            pre.append(batch * prompt / prefill_s)
            dec.append(batch * gen / decode_s)
            ttft.append(prefill_s)
        if progress is not None:
            progress.update(1)
    return {"batch": batch, "prompt": prompt, "gen": gen, "prefill_tok_s": stats(pre), "decode_tok_s": stats(dec),
            "ttft_s": stats(ttft)}


def engine_once(model, ids: torch.Tensor, gen: int) -> tuple[float, float]:
    """One llmopt run: prefill ``ids`` [batch, prompt] and take the greedy token, then ``gen`` greedy decode steps
    (``decode_greedy_steps``, as in ``generate``: on a replayed Vulkan step only the ids come back, two steps in
    flight)."""
    _sync(model)
    t0 = time.perf_counter()
    logits, state = model.prefill(ids, max_len=ids.shape[1] + gen)
    tok = logits.argmax(-1)
    t1 = time.perf_counter()
    model.decode_greedy_steps(state, tok, gen)
    _sync(model)
    return t1 - t0, time.perf_counter() - t1


def time_engine(model, vocab: int, prompt: int, gen: int, batch: int, warmup: int, repeats: int,
                progress=None) -> dict:
    """Prefill ``prompt`` tokens and decode ``gen`` tokens greedily, ``warmup`` + ``repeats`` times."""
    if prompt < 1 or gen < 1 or batch < 1 or repeats < 1:
        raise LlmoptError(f"bench settings: prompt_len, gen_len, batch and repeats must be >= 1 "
                          f"(got {prompt}, {gen}, {batch}, {repeats})")
    ids = prompt_ids(vocab, batch, prompt)
    return time_runs(lambda: engine_once(model, ids, gen), batch, prompt, gen, warmup, repeats, progress)

"""End-to-end tuning of quantization parameters (EfficientQAT's E2E-QP) after the codes are fixed.

GPTQ (or any method) chooses every weight's integer code; tuning then trains every group's scale and zero point,
codes frozen, to minimize ``KL(float model's next-token distribution || quantized model's)`` on calibration text
(disjoint from evaluation). The stored format does not change: the tuned scales and zeros are rounded to their
storage dtype and written beside the same codes. Because the loss is the model's output, a tied embedding/head
table's scales see both of its roles (input lookup and output head), which GPTQ's head-only objective cannot.

Parametrization: ``s = s0 * (1 + u a)`` and ``z = z0 + b`` with ``a, b`` starting at 0, so Adam's step size is
unit-free (a fraction of each scale, ``u = min(1, 2**(4 - bits))`` of it for formats wider than 4 bits; code units
for zero points). Cosine learning-rate decay to 0. With ``norms`` the body's 1-D float weights (RMSNorm gains,
biases; stored unquantized in every scheme) train beside them: a norm gain is a per-channel scale of the next
weights' input, which group-wise scales cannot express.

Learned rounding (``round_lr`` > 0, AutoRound's signed gradient descent on GPTQ's codes): every weight gets an offset
``v`` in [-1, 1], starting at 0, and the code used is ``clamp(c0 + round(v))`` (gradient straight through the
rounding), so a code moves by at most one step, and only where the gradient keeps pushing it the same way: each
step moves ``v`` by ``round_lr`` (cosine-decayed) in the sign of its gradient, so ``round_lr * steps / 2`` is the
furthest it can go and 0.5 is where a code flips. The tuned codes are packed back into the same format.

The float model's distributions are computed once per calibration window and kept as its top ``topk`` tokens'
log-probabilities plus the mass of the rest (one bucket; exact when ``topk`` covers the vocabulary), so the
teacher's head is not recomputed at every step. Cost per step of ``T`` tokens, ``P`` body parameters and a
``V x d`` head: the body's forward and backward (``~6 P T`` flops, float32), the student's logits (``V d T``,
float32: a bfloat16 output would round a logit of 20 to 0.06, the size of what is learnt) and the two gradient
products (bfloat16 inputs, AMX: only gradients are rounded). The KL runs over token chunks, so the ``T x V`` logits
never exist at once. Memory: the float model, the codes (float32, so dequantizing is one ``addcmul``), one
dequantized copy and its gradient (``~20 bytes`` per parameter, 12 more with learned rounding); ``check_fits``
refuses models that would not fit the machine's available memory. Gemma 3 270M, one core: ~4.4 s per 128-token
step, ~9 s per 512-token step, ~15 s with learned rounding (docs/benchmarks.md).

    python -m llmopt.quant.tune     # tunes a random tiny model's int4 weights, prints the KL before and after
"""

from __future__ import annotations

import math
import time

import psutil
import torch
from tqdm import tqdm

from llmopt.errors import LlmoptError
from llmopt.quant.format import QuantizedTensor, pack_bits

# measured best on the real Gemma 3 270M (docs/benchmarks.md, "Round 5"): windows as long as the evaluation's, each new
DEFAULTS = {"steps": 200, "lr": 1e-3, "tokens": 512, "params": "all", "topk": 1024, "windows": "fresh", "norms": False,
            "round_lr": 0.0}
PARAMS = ("all", "layers", "table")  # which tensors' scales and zeros are trained
WINDOWS = ("calibration", "fresh")  # cycle the calibration windows, or read steps x tokens of calibration text once
BYTES_PER_PARAM = 20  # float model 4, codes 4, dequantized weight 4, its gradient 4, temporaries ~4
ROUNDING_BYTES = 12  # learned rounding: the offsets 4, their gradient 4, the moved codes 4
KL_WINDOWS = 8  # calibration windows whose mean KL is reported before and after tuning
_KL_CHUNK = 128  # tokens per head chunk: 128 x 262144 float32 logits = 128 MB, a few of them alive at once


class _Dequantize(torch.autograd.Function):
    """``W = (codes - z) * s`` per group, with the gradients of ``s``, ``z`` and (learned rounding) ``codes``.
    ``codes`` is float32 (exact for integers): converting from uint8 at every step cost more than the matmuls."""

    @staticmethod
    def forward(ctx, codes, s, z):
        ctx.save_for_backward(codes, s, z)
        return torch.addcmul((-z * s).unsqueeze(-1), codes, s.unsqueeze(-1)).flatten(1)

    @staticmethod
    def backward(ctx, grad_w):
        codes, s, z = ctx.saved_tensors
        g = grad_w.view(codes.shape)
        g_sum = g.sum(-1)
        grad_s = (g * codes).sum(-1) - z * g_sum
        grad_codes = g * s.unsqueeze(-1) if ctx.needs_input_grad[0] else None
        return grad_codes, grad_s, -s * g_sum


class TunedTensor(torch.nn.Module):
    """One quantized weight with trainable relative scale and zero offsets around its stored values, and with
    ``rounding`` a trainable rounding offset a weight (its code moves by at most one step)."""

    def __init__(self, qt: QuantizedTensor, rounding: bool = False):
        super().__init__()
        out, n_in = qt.shape
        self.qt = qt
        self.register_buffer("codes", qt.unpacked().view(out, n_in // qt.group, qt.group).float(), persistent=False)
        self.register_buffer("s0", qt.scales.float(), persistent=False)
        self.register_buffer("z0", (torch.full_like(self.s0, 2.0 ** (qt.bits - 1)) if qt.sym else qt.zeros.float()),
                             persistent=False)
        # Adam moves every offset by ~lr a step whatever its gradient; a wider format's scale tolerates a
        # proportionally smaller relative change (its rounding error halves with every bit), so above 4 bits the
        # offset is in units of 2**(4 - bits): lr 1e-3 moved int8 scales ~16x too far (docs/benchmarks.md, Round 5)
        self.unit = min(1.0, 2.0 ** (4 - qt.bits))
        self.a = torch.nn.Parameter(torch.zeros_like(self.s0))
        self.b = None if qt.sym else torch.nn.Parameter(torch.zeros_like(self.s0))
        self.v = torch.nn.Parameter(torch.zeros_like(self.codes)) if rounding else None

    def scales_zeros(self) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.s0 * (1 + self.unit * self.a)
        return s, self.z0 if self.b is None else self.z0 + self.b

    def scale_zero_params(self) -> list[torch.nn.Parameter]:
        return [self.a] + ([] if self.b is None else [self.b])

    def current_codes(self) -> torch.Tensor:
        if self.v is None:
            return self.codes
        moved = self.codes + self.v + (self.v.round() - self.v).detach()  # round(v), gradient straight through;
        # c + v + (r - v) is within float rounding of c + r, so the stored codes are rounded once more
        return moved.clamp(0, 2 ** self.qt.bits - 1)

    def forward(self) -> torch.Tensor:
        return _Dequantize.apply(self.current_codes(), *self.scales_zeros())

    @torch.no_grad()
    def stored(self) -> QuantizedTensor:
        """The tuned tensor in its storage format: its codes (GPTQ's, or moved by learned rounding), scales (and
        zeros) rounded to their dtype."""
        s, z = self.scales_zeros()
        dtype = self.qt.scales.dtype
        s = s.to(dtype)
        s = torch.where(s == 0, self.qt.scales, s)  # an underflowed scale would zero its whole group
        zeros = None if self.qt.sym else z.to(dtype)
        qweight = (self.qt.qweight if self.v is None
                   else pack_bits(self.current_codes().round().flatten(1), self.qt.bits))
        return QuantizedTensor(qweight, s, zeros, self.qt.bits, self.qt.group, self.qt.shape, self.qt.orig_dtype)

    @torch.no_grad()
    def sign_step(self, step: float) -> None:
        """Signed gradient descent on the rounding offsets, kept in [-1, 1] (one code step either way)."""
        if self.v is not None and self.v.grad is not None:
            self.v.sub_(self.v.grad.sign(), alpha=step).clamp_(-1, 1)
            self.v.grad = None


def check_fits(n_params: int, name: str = "model", rounding: bool = False) -> None:
    """Raise when end-to-end tuning of ``n_params`` parameters (with learned ``rounding``) would not fit in this
    machine's available memory."""
    per_param = BYTES_PER_PARAM + (ROUNDING_BYTES if rounding else 0)
    need = per_param * n_params
    avail = psutil.virtual_memory().available
    if need > avail:
        raise LlmoptError(f"{name}: end-to-end tuning of {n_params / 1e9:.2f} B parameters needs about "
                          f"{need / 2**30:.1f} GiB ({per_param} bytes each), this machine has "
                          f"{avail / 2**30:.1f} GiB available; drop `tune` from the scheme or use a larger machine")


class _Student:
    """The model with its quantized weights replaced by tunable tensors: body hidden states and the head weight."""

    def __init__(self, model, tensors: dict[str, QuantizedTensor], params: str,
                 norms: dict[str, torch.Tensor] | None = None, rounding: bool = False):
        self.model = model
        self.base = model.base_model
        prefix = model.base_model_prefix + "."
        self.head = model.get_output_embeddings()
        embed = model.get_input_embeddings()
        names = {p: n for n, p in model.named_parameters()}
        self.head_name = names[self.head.weight]
        self.tied = self.head.weight is embed.weight
        self.table_names = {names[embed.weight], self.head_name}
        self.tuned = {n: TunedTensor(qt, rounding) for n, qt in tensors.items() if n in names.values()}
        for n, t in self.tuned.items():
            train = params == "all" or (params == "table") == (n in self.table_names)
            for p in t.parameters():
                p.requires_grad_(train)
        self.body_names = {n: n.removeprefix(prefix) for n in self.tuned if n.startswith(prefix)}
        self.norms = {n: torch.nn.Parameter(v.detach().float().clone()) for n, v in (norms or {}).items()}
        self.body_norms = {n.removeprefix(prefix): p for n, p in self.norms.items()}  # the same parameters
        self.softcap = getattr(model.config, "final_logit_softcapping", None)

    def trainable(self) -> list[torch.nn.Parameter]:
        """What Adam trains: the scale and zero offsets selected by ``params``, and the norm gains."""
        return [p for t in self.tuned.values() for p in t.scale_zero_params() if p.requires_grad] + \
            list(self.norms.values())

    def weights(self) -> dict[str, torch.Tensor]:
        return {n: t() for n, t in self.tuned.items()}

    def hidden(self, weights: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
        body = {short: weights[n] for n, short in self.body_names.items()}
        body.update(self.body_norms)
        out = torch.func.functional_call(self.base, body, (ids.unsqueeze(0),), tie_weights=True)
        return out.last_hidden_state[0]

    def head_weight(self, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        return weights.get(self.head_name, self.head.weight)


def _logits(h: torch.Tensor, w: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = h @ w.T
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


@torch.no_grad()
def teacher_targets(h_f: torch.Tensor, w_f: torch.Tensor, k: int, softcap: float | None = None,
                    chunk: int = _KL_CHUNK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The float model's next-token distributions, kept as the top ``k`` tokens' log-probabilities plus the mass
    of the rest: ``(ids [T, k], log p [T, k], tail mass [T])`` (a few MB per window instead of ``T x V``)."""
    ids, logp, tail = [], [], []
    for c0 in range(0, h_f.shape[0], chunk):
        lf = torch.log_softmax(_logits(h_f[c0:c0 + chunk], w_f, softcap), -1)
        top = lf.topk(min(k, lf.shape[-1]), -1)
        ids.append(top.indices)
        logp.append(top.values)
        tail.append(lf.exp_().scatter_(1, top.indices, 0.0).sum(-1))  # summed directly: 1 - sum(top) cancels
    return torch.cat(ids), torch.cat(logp), torch.cat(tail)


def head_kl(h_q: torch.Tensor, w_q: torch.Tensor, targets: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
            softcap: float | None = None, grad_dtype: torch.dtype = torch.bfloat16, chunk: int = _KL_CHUNK):
    """Mean over tokens of ``KL(p || q)``, ``q = softmax(h_q w_q^T)`` and ``p`` the teacher's ``targets``, over
    the top-k tokens plus one bucket for the rest (exact when k covers the vocabulary; otherwise the teacher's
    tail is taken to have the student's shape), and its gradients with respect to ``h_q`` and ``w_q``:
    ``d KL / d logit = q - p`` on the top k, ``q * (1 - p_tail / q_tail)`` on the rest."""
    ids, logp_f, tail_f = targets
    n = h_q.shape[0]
    total = 0.0
    g_all = torch.empty(n, w_q.shape[0], dtype=grad_dtype)
    for c0 in range(0, n, chunk):
        i, lf, tf = ids[c0:c0 + chunk], logp_f[c0:c0 + chunk], tail_f[c0:c0 + chunk]
        raw = h_q[c0:c0 + chunk] @ w_q.T
        lq = torch.log_softmax(raw if softcap is None else torch.tanh(raw / softcap) * softcap, -1)
        lq_top = lq.gather(1, i)
        q = lq.exp_().scatter_(1, i, 0.0)  # the student's tail, in place of its log-probabilities
        tq = q.sum(-1)
        pf = lf.exp()
        total += float((pf * (lf - lq_top)).sum() + (torch.xlogy(tf, tf) - tf * tq.clamp_min(1e-30).log()).sum())
        ratio = torch.where(tq > 0, tf / tq.clamp_min(1e-30), torch.zeros_like(tq))
        g = q.mul_((1 - ratio).unsqueeze(1)).scatter_(1, i, lq_top.exp() - pf).div_(n)
        if softcap is not None:
            g.mul_(1 - torch.tanh(raw / softcap).square())
        g_all[c0:c0 + chunk] = g
    grad_h = (g_all @ w_q.to(grad_dtype)).to(h_q.dtype)
    grad_w = (g_all.T @ h_q.to(grad_dtype)).to(w_q.dtype)
    return total / n, grad_h, grad_w


def tune(model, tensors: dict[str, QuantizedTensor], windows: list[torch.Tensor], steps: int = DEFAULTS["steps"],
         lr: float = DEFAULTS["lr"], params: str = DEFAULTS["params"], topk: int = DEFAULTS["topk"],
         norms: bool = DEFAULTS["norms"], round_lr: float = DEFAULTS["round_lr"],
         grad_dtype: torch.dtype = torch.bfloat16,
         desc: str = "tune") -> tuple[dict[str, torch.Tensor | QuantizedTensor], dict]:
    """Tune the scales and zeros of ``tensors`` (name -> packed weight of ``model``, the float model), with
    ``norms`` the body's 1-D float weights, and with ``round_lr`` > 0 the codes themselves (learned rounding), for
    ``steps`` steps, one calibration window per step, cycling; returns the tuned tensors (packed, and the float 1-D
    ones by name) and a report (KL on the first ``KL_WINDOWS`` windows before and after, per-step KL curve, share
    of codes moved)."""
    if params not in PARAMS:
        raise LlmoptError(f"tune: params {params!r} is not one of {PARAMS}")
    if not 0 <= round_lr < 1:
        raise LlmoptError(f"tune: round_lr {round_lr!r} must be in [0, 1) (code steps per step; 0 keeps the codes)")
    if not windows:
        raise LlmoptError("tune: no calibration windows")
    start = time.time()
    for p in model.parameters():
        p.requires_grad_(False)
    prefix = model.base_model_prefix + "."
    floats = {n: p for n, p in model.named_parameters() if p.dim() == 1 and n.startswith(prefix)} if norms else {}
    student = _Student(model, tensors, params, floats, rounding=round_lr > 0)
    trainable = student.trainable()
    if not trainable:
        raise LlmoptError(f"tune: params={params!r} selects no quantized tensor of this model")
    w_f = student.head.weight.detach()
    with torch.no_grad():
        teacher = [teacher_targets(model.base_model(w.unsqueeze(0)).last_hidden_state[0], w_f, topk, student.softcap)
                   for w in tqdm(windows, desc="tune: teacher distributions", leave=False)]
    kl_before = _mean_kl(student, windows[:KL_WINDOWS], teacher, grad_dtype)
    opt = torch.optim.Adam(trainable, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    curve = []
    bar = tqdm(range(steps), desc=desc, unit="step")
    for step in bar:
        ids, targets = windows[step % len(windows)], teacher[step % len(windows)]
        opt.zero_grad(set_to_none=True)
        weights = student.weights()
        h_q = student.hidden(weights, ids)
        w_q = student.head_weight(weights)
        kl, grad_h, grad_w = head_kl(h_q.detach(), w_q.detach(), targets, student.softcap, grad_dtype)
        outs, grads = [h_q], [grad_h]
        if w_q.requires_grad:
            outs.append(w_q)
            grads.append(grad_w)
        torch.autograd.backward(outs, grads)
        opt.step()
        for t in student.tuned.values():
            t.sign_step(round_lr * sched.get_last_lr()[0] / lr)
        sched.step()
        curve.append(kl)
        bar.set_postfix(kl=f"{sum(curve[-20:]) / len(curve[-20:]):.4f}")
        del weights, h_q, w_q, grad_h, grad_w
    tuned = {n: t.stored() for n, t in student.tuned.items()}
    moved = sum(int((tuned[n].unpacked() != t.qt.unpacked()).sum()) for n, t in student.tuned.items())
    total = sum(t.qt.shape[0] * t.qt.shape[1] for t in student.tuned.values())
    tuned_floats = {n: p.detach().to(floats[n].dtype) for n, p in student.norms.items()}
    kl_after = _mean_kl(_Student(model, tuned, params, tuned_floats), windows[:KL_WINDOWS], teacher, grad_dtype)
    report = {"steps": steps, "lr": lr, "params": params, "topk": topk, "norms": len(tuned_floats),
              "round_lr": round_lr, "codes_moved": moved / total, "windows": len(windows),
              "kl_windows": min(KL_WINDOWS, len(windows)), "tokens_per_step": int(windows[0].numel()),
              "kl_before": kl_before, "kl_after": kl_after,
              "kl_curve": [round(x, 5) for x in curve], "time_s": round(time.time() - start, 1)}
    return {**tensors, **tuned, **tuned_floats}, report


@torch.no_grad()
def _mean_kl(student: _Student, windows, teacher, grad_dtype) -> float:
    """Token-weighted mean KL over the calibration windows (the top-k bucketed KL that is trained)."""
    weights = student.weights()
    w_q = student.head_weight(weights)
    kls = [head_kl(student.hidden(weights, ids), w_q, t, student.softcap, grad_dtype)[0] * len(ids)
           for ids, t in zip(tqdm(windows, desc="tune: KL", leave=False), teacher)]
    return sum(kls) / sum(len(w) for w in windows)


def main() -> None:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from llmopt.quant.quantizers import Spec, quantize

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=64)
    model = Gemma3ForCausalLM(cfg).eval()
    spec = Spec(4, 32, sym=False)
    tensors = {n: quantize(p.detach(), spec, "rtn", name=n) for n, p in model.named_parameters()
               if n.endswith(".weight") and p.dim() == 2}
    windows = [torch.randint(0, cfg.vocab_size, (65,)) for _ in range(4)]
    _, report = tune(model, tensors, windows, steps=60, lr=1e-2)
    print(f"KL before {report['kl_before']:.5f}, after {report['kl_after']:.5f} ({report['time_s']} s)")


if __name__ == "__main__":
    main()

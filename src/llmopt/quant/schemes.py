"""Quantization schemes: the dict the quantize stage receives, validated, with named presets and byte budgets.

Keys (docs/FORMAT.md "Schemes" has the same table):

| key | meaning | default |
|---|---|---|
| ``name`` | scheme name; without ``method`` it names a preset (other keys given override the preset's) | required |
| ``method`` | ``none`` (float copy), ``rtn``, ``mse`` (clip/scale search), ``gptq`` (calibrated), ``mixed`` | required |
| ``bits`` | 2, 3, 4, 5, 6 or 8 (rtn / mse / gptq) | required |
| ``group`` | group size along the input dim; 0 = one group per row (per output channel) | 0 for 8 bits, else 128 |
| ``sym`` | symmetric (no zero point) or asymmetric (float zero point per group) | true |
| ``embedding`` | format of the vocabulary tables (token embedding, output head; a tied head is the embedding), ``{"bits", "group", "sym"}``, overriding ``bits``/``group``/``sym`` (and fixing them in ``mixed``) | as the other tensors |
| ``scale_dtype`` | ``float16`` or ``bfloat16`` scales (and zero points) | float16 |
| ``dtype`` | ``none`` only: float dtype of the copy (``bfloat16``, ``float16``, ``float32``) | the source dtype |
| ``budget`` | ``mixed`` only: ``seed`` (model entry ``seed.size_gb`` over ``params_full``, as bits per weight), ``{"bpw": x}`` or ``{"bytes": n}`` | required |
| ``options`` | ``mixed`` only: formats the knapsack chooses from, ``[{"bits", "group", "sym"}, ...]`` | ``MIXED_OPTIONS`` |
| ``base`` | ``mixed`` only: method that quantizes each tensor (rtn / mse / gptq) | mse |
| ``gptq`` | gptq (or ``mixed`` with base gptq) only: ``{"damp": x, "table_damp": y}``, the dampening added to the Hessian's diagonal (fraction of its mean) of every tensor / of a vocabulary table quantized as the head | ``GPTQ_DAMP``, ``damp`` |
| ``tune`` | quantized schemes (not ``none``): end-to-end tuning of every group's scale and zero after the codes are fixed (``llmopt.quant.tune``), ``{"steps", "lr", "tokens" (per step), "params" (all / layers / table), "topk", "windows" (calibration / fresh), "norms" (train the 1-D float weights too), "round_lr" (learned rounding: the codes move too)}``; needs real weights | off; keys default to ``tune.DEFAULTS`` |
| ``sensitivity`` | ``mixed`` only: ``fisher`` (real models), ``output`` (imatrix-weighted error), ``mse`` (plain), ``auto`` | auto |
| ``on_indivisible`` | a 2-D weight whose width the group does not divide: ``error`` or ``keep`` (stored in float) | error |
| ``calibration`` | ``{"texts": [...], "tokens": n}``: text for gptq / imatrix / fisher, disjoint from evaluation | 8 plays, 4096 |
| ``perplexity`` | ``{"texts": [...], "tokens": n, "window": w}`` or ``false``; evaluated when the weights are real | hamlet + P&P, 4096, 512 |
| ``shard_bytes`` | largest output shard | 2e9 |

Quantized: every 2-D ``*.weight`` (linear layers, embeddings, an untied output head); 1-D tensors (norms, biases)
and tensors of other ranks stay float. Vocabulary tables are the tensors named ``*embed_tokens.weight`` and
``*lm_head.weight``: in small models they are most of the parameters, so llama.cpp keeps them at 6-8 bits even in
its 4-bit types, and ``embedding`` does the same here. ``bpw`` budgets count every stored byte (norms included) over every
parameter of the model; GB is 10**9 bytes, as in FACTS §1.
"""

from __future__ import annotations

from llmopt.errors import LlmoptError
from llmopt.quant.format import SUPPORTED_BITS
from llmopt.quant.quantizers import GPTQ_DAMP, Spec
from llmopt.quant.texts import CALIBRATION_PLAYS, EVAL_TEXTS

METHODS = ("none", "rtn", "mse", "gptq", "mixed")
PRESETS: dict[str, dict] = {
    "bf16": {"method": "none", "dtype": "bfloat16"},
    "w8": {"method": "rtn", "bits": 8, "group": 0},
    "w8g32": {"method": "rtn", "bits": 8, "group": 32},  # llama.cpp Q8_0's layout: 8.5 bits per weight
    "w4g128": {"method": "rtn", "bits": 4, "group": 128},
    "w4g128-mse": {"method": "mse", "bits": 4, "group": 128, "sym": False},
    # the int4 tied table's GPTQ damped 10x more: measured better here (docs/benchmarks.md, "Round 3")
    "w4g128-gptq": {"method": "gptq", "bits": 4, "group": 128, "sym": False, "gptq": {"table_damp": 0.1}},
    # w4g128-gptq's codes, then every scale and zero trained on the float model's next-token distributions ("Round 4")
    "w4g128-gptq-tuned": {"method": "gptq", "bits": 4, "group": 128, "sym": False, "gptq": {"table_damp": 0.1},
                          "tune": {}},
    "w4g128-gptq-emb8": {"method": "gptq", "bits": 4, "group": 128, "sym": False, "embedding": {"bits": 8, "group": 32}},
    # its int4 layers' scales and zeros then tuned end to end, the int8 table kept as GPTQ left it ("Round 6")
    "w4g128-gptq-emb8-tuned": {"method": "gptq", "bits": 4, "group": 128, "sym": False,
                               "embedding": {"bits": 8, "group": 32}, "tune": {"params": "layers"}},
    "w4g32": {"method": "rtn", "bits": 4, "group": 32},  # llama.cpp Q4_0's layout: 4.5 bits per weight
    "w4g32-gptq": {"method": "gptq", "bits": 4, "group": 32},
    "w3g64": {"method": "mse", "bits": 3, "group": 64, "sym": False},
    "w3g64-gptq": {"method": "gptq", "bits": 3, "group": 64, "sym": False},
    "w2g32": {"method": "mse", "bits": 2, "group": 32, "sym": False},
    "seed-size": {"method": "mixed", "budget": "seed"},
}
MIXED_OPTIONS = ({"bits": 2, "group": 128, "sym": False}, {"bits": 2, "group": 64, "sym": False},
                 {"bits": 3, "group": 128, "sym": False}, {"bits": 3, "group": 64, "sym": False},
                 {"bits": 4, "group": 128, "sym": False}, {"bits": 4, "group": 32, "sym": False},
                 {"bits": 5, "group": 32, "sym": True}, {"bits": 6, "group": 64, "sym": True},
                 {"bits": 8, "group": 0, "sym": True})
_KEYS = {"name", "method", "bits", "group", "sym", "embedding", "scale_dtype", "dtype", "budget", "options", "base",
         "sensitivity", "on_indivisible", "calibration", "perplexity", "shard_bytes", "gptq", "tune"}
_FLOAT_DTYPES = ("bfloat16", "float16", "float32")


def resolve(scheme: dict | str) -> dict:
    """The full, validated scheme dict (defaults filled in) for a scheme dict or preset name."""
    if isinstance(scheme, str):
        scheme = {"name": scheme}
    if not isinstance(scheme, dict) or not isinstance(scheme.get("name"), str):
        raise LlmoptError(f"scheme: expected a dict with a string 'name', got {scheme!r}")
    name = scheme["name"]
    if "method" not in scheme:  # a preset, possibly with some keys overridden
        if name not in PRESETS:
            raise LlmoptError(f"scheme '{name}': unknown scheme (presets: {', '.join(PRESETS)}); give 'method' and its keys")
        scheme = {"name": name, **PRESETS[name], **scheme}
    unknown = sorted(set(scheme) - _KEYS)
    if unknown:
        raise LlmoptError(f"scheme '{name}': unknown key(s) {unknown} (known: {sorted(_KEYS)})")
    method = scheme.get("method")
    if method not in METHODS:
        raise LlmoptError(f"scheme '{name}': method {method!r} is unknown (expected one of {METHODS})")
    out = dict(scheme)
    out.setdefault("scale_dtype", "float16")
    out.setdefault("on_indivisible", "error")
    out.setdefault("shard_bytes", 2 * 10**9)
    out["calibration"] = {"texts": list(CALIBRATION_PLAYS), "tokens": 4096, **(scheme.get("calibration") or {})}
    ppl = scheme.get("perplexity", {})
    out["perplexity"] = False if ppl is False else {"texts": list(EVAL_TEXTS), "tokens": 4096, "window": 512, **ppl}
    _check(out, name)
    return out


def _check(s: dict, name: str) -> None:
    where = f"scheme '{name}'"
    if s["scale_dtype"] not in ("float16", "bfloat16"):
        raise LlmoptError(f"{where}: scale_dtype {s['scale_dtype']!r} is not float16 or bfloat16")
    if s["on_indivisible"] not in ("error", "keep"):
        raise LlmoptError(f"{where}: on_indivisible {s['on_indivisible']!r} is not 'error' or 'keep'")
    if not isinstance(s["shard_bytes"], int) or s["shard_bytes"] < 2**20:
        raise LlmoptError(f"{where}: shard_bytes must be an integer >= 1 MiB")
    overlap = set(s["calibration"]["texts"]) & set(s["perplexity"]["texts"] if s["perplexity"] else [])
    if overlap:
        raise LlmoptError(f"{where}: calibration and perplexity texts overlap ({sorted(overlap)}); they must be disjoint")
    method = s["method"]
    if method == "gptq" or (method == "mixed" and s.get("base") == "gptq"):
        _check_gptq(s, where)
    elif "gptq" in s:
        raise LlmoptError(f"{where}: gptq options are set but the scheme does not use gptq (method {method!r})")
    if "tune" in s:
        _check_tune(s, where)
    if "embedding" in s:
        emb = s["embedding"]
        if method == "none":
            raise LlmoptError(f"{where}: embedding is set but method 'none' quantizes nothing")
        if not isinstance(emb, dict) or "bits" not in emb or not set(emb) <= {"bits", "group", "sym"}:
            raise LlmoptError(f"{where}: embedding must be {{bits, group?, sym?}} (the vocabulary tables' format), got {emb!r}")
        spec_e = _spec_of(emb, s["scale_dtype"], f"{where} embedding")
        s["embedding"] = {"bits": spec_e.bits, "group": spec_e.group, "sym": spec_e.sym}
    if method == "none":
        if s.get("dtype", "bfloat16") not in _FLOAT_DTYPES:
            raise LlmoptError(f"{where}: dtype {s['dtype']!r} is not one of {_FLOAT_DTYPES}")
        return
    if method == "mixed":
        budget = s.get("budget")
        if budget != "seed" and not (isinstance(budget, dict) and len(budget) == 1 and set(budget) <= {"bpw", "bytes"}
                                     and isinstance(next(iter(budget.values())), (int, float))
                                     and next(iter(budget.values())) > 0):
            raise LlmoptError(f"{where}: budget must be 'seed', {{bpw: x}} or {{bytes: n}} with a positive number, got {budget!r}")
        s.setdefault("base", "mse")
        s.setdefault("sensitivity", "auto")
        s["options"] = [dict(o) for o in s.get("options") or MIXED_OPTIONS]
        if s["base"] not in ("rtn", "mse", "gptq"):
            raise LlmoptError(f"{where}: base {s['base']!r} is not rtn, mse or gptq")
        if s["sensitivity"] not in ("auto", "fisher", "output", "mse"):
            raise LlmoptError(f"{where}: sensitivity {s['sensitivity']!r} is not auto, fisher, output or mse")
        for o in s["options"]:
            _spec_of(o, s["scale_dtype"], f"{where} option {o}")
        return
    s.setdefault("group", 0 if s.get("bits") == 8 else 128)
    s.setdefault("sym", True)
    _spec_of(s, s["scale_dtype"], where)


def _check_gptq(s: dict, where: str) -> None:
    opts = s.get("gptq") or {}
    if not isinstance(opts, dict) or not set(opts) <= {"damp", "table_damp"}:
        raise LlmoptError(f"{where}: gptq must be {{damp?, table_damp?}}, got {opts!r}")
    s["gptq"] = {"damp": GPTQ_DAMP, **opts}
    s["gptq"].setdefault("table_damp", s["gptq"]["damp"])
    for key, damp in s["gptq"].items():
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 < damp <= 1:
            raise LlmoptError(f"{where}: gptq.{key} {damp!r} must be a number in (0, 1] (fraction of the Hessian's mean diagonal)")


def _check_tune(s: dict, where: str) -> None:
    from llmopt.quant.tune import DEFAULTS, PARAMS, WINDOWS

    opts = s["tune"] if s["tune"] is not None else {}
    if s["method"] == "none":
        raise LlmoptError(f"{where}: tune applies to quantized schemes (rtn, mse, gptq, mixed), not method 'none'")
    if not isinstance(opts, dict) or not set(opts) <= set(DEFAULTS):
        raise LlmoptError(f"{where}: tune must be a dict with keys among {sorted(DEFAULTS)}, got {opts!r}")
    s["tune"] = {**DEFAULTS, **opts}
    for key in ("steps", "tokens", "topk"):
        v = s["tune"][key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise LlmoptError(f"{where}: tune.{key} {v!r} must be a positive integer")
    lr = s["tune"]["lr"]
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < 1:
        raise LlmoptError(f"{where}: tune.lr {lr!r} must be a number in (0, 1) (a fraction of each scale per step)")
    if s["tune"]["params"] not in PARAMS:
        raise LlmoptError(f"{where}: tune.params {s['tune']['params']!r} is not one of {PARAMS}")
    round_lr = s["tune"]["round_lr"]
    if isinstance(round_lr, bool) or not isinstance(round_lr, (int, float)) or not 0 <= round_lr < 1:
        raise LlmoptError(f"{where}: tune.round_lr {round_lr!r} must be a number in [0, 1) (code steps a step; 0 keeps "
                          "the codes)")
    if not isinstance(s["tune"]["norms"], bool):
        raise LlmoptError(f"{where}: tune.norms {s['tune']['norms']!r} must be true or false")
    if s["tune"]["windows"] not in WINDOWS:
        raise LlmoptError(f"{where}: tune.windows {s['tune']['windows']!r} is not one of {WINDOWS}")


def _spec_of(d: dict, scale_dtype: str, where: str) -> Spec:
    bits, group, sym = d.get("bits"), d.get("group", 0 if d.get("bits") == 8 else 128), d.get("sym", True)
    if bits not in SUPPORTED_BITS:
        raise LlmoptError(f"{where}: bits {bits!r} is not one of {SUPPORTED_BITS}")
    if not isinstance(group, int) or isinstance(group, bool) or group < 0 or (group and group % 8):
        raise LlmoptError(f"{where}: group {group!r} must be 0 (per output channel) or a positive multiple of 8")
    if not isinstance(sym, bool):
        raise LlmoptError(f"{where}: sym must be true or false, got {sym!r}")
    return Spec(bits, group, sym, scale_dtype)


def spec(scheme: dict) -> Spec:
    """The single tensor format of a resolved rtn / mse / gptq scheme."""
    return _spec_of(scheme, scheme["scale_dtype"], f"scheme '{scheme['name']}'")


def options(scheme: dict) -> list[Spec]:
    """The formats a resolved ``mixed`` scheme chooses from."""
    return [_spec_of(o, scheme["scale_dtype"], f"scheme '{scheme['name']}'") for o in scheme["options"]]


def embedding_spec(scheme: dict) -> Spec | None:
    """The format a resolved scheme gives vocabulary tables, when it sets one (``embedding``)."""
    emb = scheme.get("embedding")
    return None if emb is None else _spec_of(emb, scheme["scale_dtype"], f"scheme '{scheme['name']}' embedding")


def is_vocabulary_table(name: str) -> bool:
    """The token embedding or the output head (Hugging Face names, any prefix)."""
    return name.endswith(("embed_tokens.weight", "lm_head.weight"))


def is_quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """Every 2-D weight (linear, embedding, head) is quantized; norms, biases and convolutions stay float."""
    return name.endswith(".weight") and len(shape) == 2


def budget_bytes(scheme: dict, model_entry: dict, total_params: int) -> tuple[int, float]:
    """``(bytes, bits per weight)`` a ``mixed`` scheme may use for a model of ``total_params`` parameters."""
    budget = scheme["budget"]
    if budget == "seed":
        seed = (model_entry or {}).get("seed") or {}
        size_gb, params_full = seed.get("size_gb"), (model_entry or {}).get("params_full")
        if not isinstance(size_gb, (int, float)) or size_gb <= 0:
            raise LlmoptError(f"scheme '{scheme['name']}': model entry has no seed.size_gb (needed by budget: seed)")
        if not isinstance(params_full, int) or params_full <= 0:
            raise LlmoptError(f"scheme '{scheme['name']}': model entry has no positive params_full (needed by budget: seed)")
        bpw = size_gb * 1e9 * 8 / params_full
    elif "bpw" in budget:
        bpw = float(budget["bpw"])
    else:
        return int(budget["bytes"]), 8.0 * budget["bytes"] / total_params
    return int(bpw * total_params / 8), bpw

"""Qwen2.5-VL at tiny scale vs Hugging Face: image preprocessing, the vision tower, text+image prompt logits.

The tiny config keeps every feature: window attention with windows that do not tile the image (padding),
full-attention blocks, the 2x2 merger, M-RoPE sections, text before and after the image. Fresh random weights.
Tolerances: pixel patches 1e-5 against Qwen2VLImageProcessorPil (same PIL bicubic resize); tower features and
logits 1e-4 absolute (float32).
"""

from __future__ import annotations

import pytest
import torch

from llmopt.engine import load_model
from llmopt.engine.vision import ImageInput, preprocess_image
from llmopt.errors import LlmoptError
from tiny_models import IMAGE_TOKEN, VISION_END, VISION_START, qwen25_vl, randomize


@pytest.fixture(scope="module")
def tiny_vl(tmp_path_factory):
    seed = int(torch.randint(0, 2**30, ()))
    hf = randomize(qwen25_vl(), seed, scale=0.1)
    folder = tmp_path_factory.mktemp("qwen25vl")
    hf.save_pretrained(folder)
    return seed, hf, load_model(folder)


def random_image(h, w):
    from PIL import Image

    return Image.fromarray(torch.randint(0, 256, (h, w, 3), dtype=torch.uint8).numpy())


def test_preprocess_matches_hf_processor(tiny_vl):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    img = random_image(100, 150)
    ours = preprocess_image(img, tiny_vl[2].args.vision)
    ref = Qwen2VLImageProcessorPil()(images=[img], return_tensors="pt")
    assert list(ref["image_grid_thw"][0]) == list(ours.grid_thw)
    assert (ours.pixel_values - ref["pixel_values"]).abs().max() < 1e-5


def test_vision_tower_matches_hf(tiny_vl):
    seed, hf, model = tiny_vl
    image = preprocess_image(random_image(112, 252), model.args.vision)  # 8 x 18 patches: windows need padding
    with torch.no_grad():
        ref = hf.model.get_image_features(image.pixel_values, torch.tensor([image.grid_thw])).pooler_output[0]
    got = model.vision(image)
    assert got.shape == ref.shape
    assert (got - ref).abs().max() < 1e-4, f"seed={seed}"


def test_text_and_image_prompt_logits_match_hf(tiny_vl):
    seed, hf, model = tiny_vl
    image = preprocess_image(random_image(84, 140), model.args.vision)
    n = image.n_tokens(2)
    ids = torch.tensor([[5, 6, 7, VISION_START] + [IMAGE_TOKEN] * n + [VISION_END, 8, 9, 10, 11]])
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=image.pixel_values, image_grid_thw=torch.tensor([image.grid_thw]),
                 mm_token_type_ids=(ids == IMAGE_TOKEN).int()).logits
    got = model.forward_logits(ids, images=[image])
    assert (got - ref).abs().max() < 1e-4, f"seed={seed}"
    # decode after an image prompt continues the M-RoPE positions like HF generate
    with torch.no_grad():
        hf_tokens = hf.generate(input_ids=ids, pixel_values=image.pixel_values,
                                image_grid_thw=torch.tensor([image.grid_thw]), mm_token_type_ids=(ids == IMAGE_TOKEN).int(),
                                max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:]
    logits, state = model.prefill(ids, images=[image], max_len=ids.shape[1] + 6)
    ours = []
    for _ in range(6):
        tok = logits.argmax(-1)
        ours.append(int(tok))
        logits = model.decode_step(state, tok)
    assert ours == hf_tokens.tolist(), f"seed={seed}"


def test_text_only_prompt_on_vl_model_matches_hf(tiny_vl):
    seed, hf, model = tiny_vl
    ids = torch.randint(0, 290, (1, 12))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
    assert (model.forward_logits(ids) - ref).abs().max() < 1e-4


def test_image_errors(tiny_vl):
    model = tiny_vl[2]
    image = preprocess_image(random_image(56, 56), model.args.vision)
    with pytest.raises(LlmoptError, match="placeholder"):
        model.forward_logits(torch.tensor([[5, IMAGE_TOKEN, 6]]), images=[image])
    with pytest.raises(LlmoptError, match="no images"):
        model.forward_logits(torch.tensor([[5, IMAGE_TOKEN, 6]]))
    with pytest.raises(LlmoptError, match="pixel_values"):
        model.vision(ImageInput(torch.zeros(3, 10), (1, 2, 2)))


def test_generate_with_image_file_expands_placeholder(tiny_vl, tmp_path):
    """generate() preprocesses an image file and expands the single placeholder to the image's token count."""
    seed, hf, model = tiny_vl
    path = tmp_path / "img.png"
    random_image(70, 90).save(path)
    image = preprocess_image(path, model.args.vision)
    out = model.generate([5, VISION_START, IMAGE_TOKEN, VISION_END, 7], images=[path], max_new_tokens=5, stop_ids=[])
    ids = [5, VISION_START] + [IMAGE_TOKEN] * image.n_tokens(2) + [VISION_END, 7]
    assert out.prompt_tokens[0] == ids
    logits, state = model.prefill([ids], images=[image], max_len=len(ids) + 5)
    expected = []
    for _ in range(5):
        expected.append(int(logits.argmax(-1)))
        logits = model.decode_step(state, logits.argmax(-1))
    assert out.tokens[0] == expected, f"seed={seed}"


def test_packed_vl_model_fast_matches_reference(tiny_vl, tmp_path):
    """Every 2-D weight (tower included: the fused qkv is split by rows in packed form) quantized to int4:
    the fast CPU path agrees with the dequantized float32 reference within 2e-2 relative."""
    import shutil

    from llmopt.backends import get_backend
    from llmopt.quant.format import load_packed, save_packed
    from llmopt.quant.quantizers import Spec, quantize

    seed, hf, model = tiny_vl
    src = model.folder
    dst = tmp_path / "packed"
    shutil.copytree(src, dst)
    tensors = load_packed(src / "model.safetensors")
    def spec(t):  # group 32 where the width allows (int4pack), else 16 (the bf16 fallback)
        return Spec(4, 32 if t.shape[1] % 32 == 0 else 16)

    save_packed(dst / "model.safetensors", {n: quantize(t.float(), spec(t), "rtn", name=n) if t.dim() == 2 else t
                                            for n, t in tensors.items()})
    fast = load_model(dst, backend=get_backend("cpu", repack_cache=None))
    ref = load_model(dst, backend=get_backend("cpu", quant="reference"))
    image = preprocess_image(random_image(56, 84), model.args.vision)
    ids = torch.tensor([[5, VISION_START] + [IMAGE_TOKEN] * image.n_tokens(2) + [VISION_END, 6]])
    a, b = fast.forward_logits(ids, images=[image]), ref.forward_logits(ids, images=[image])
    assert (a - b).abs().max() <= 2e-2 * b.abs().max(), f"seed={seed}"
    assert fast.backends["cpu"].kinds["int4pack"] > 0


def test_unreadable_image_file(tiny_vl, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(LlmoptError, match="not a readable image"):
        preprocess_image(bad, tiny_vl[2].args.vision)
    with pytest.raises(LlmoptError, match="aspect ratio"):
        preprocess_image(random_image(2, 600), tiny_vl[2].args.vision)

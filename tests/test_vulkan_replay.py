"""The replayed Vulkan decode step (``llmopt.backends.vulkan.replay``) against the normal decode path (lavapipe in CI).

Every family at tiny scale (float and packed weights; sliding windows, softcaps, QK-norm, GQA), Qwen2.5-VL after
an image (M-RoPE positions that differ from the cache slot), left-padded batches, the real Gemma 3 270M. The same
model decodes the same tokens through ``Model.decode_step`` with the replay off and on: logits within 1e-4
absolute (the Vulkan tests' tolerance; in practice they are bit-identical, same shaders and tables) and greedy
tokens identical; every family also against the CPU float32 reference. Greedy decoding with two replayed steps in
flight (``greedy_steps``) gives the tokens and state of one step at a time, stops mid-run included. Plus:
fallbacks with their reason, bad input, recordings isolated from other work on the backend, resources freed.
"""

from __future__ import annotations

import pytest
import torch

from llmopt.engine import load_model
from llmopt.errors import LlmoptError

from vulkan_device import require_vulkan
vulkan = require_vulkan()
pytestmark = pytest.mark.vulkan

from test_vulkan_models import ATOL, COMMON, FAMILIES, quantize_folder, save_random  # noqa: E402

VOCAB = COMMON["vocab_size"]


def decode_both(model, ids, n_prompt: int, attention_mask=None):
    """Teacher-forced decode of ``ids[:, n_prompt:]`` with the replay off, then on; logits of each step."""
    runs = []
    for replay in (False, True):
        model.static_decode = replay
        logits, state = model.prefill(ids[:, :n_prompt], attention_mask, max_len=ids.shape[1] + 1)
        steps = [logits]
        for t in range(n_prompt, ids.shape[1]):
            steps.append(model.decode_step(state, ids[:, t]))
        assert state.decode_path == ("replayed" if replay else "eager: Model.static_decode is off")
        runs.append(torch.stack(steps))
    model.static_decode = True
    return runs


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("packed", [False, True], ids=["float", "packed"])
def test_replay_matches_eager_decode(be, tmp_path, family, packed):
    from llmopt.backends.cpu import CpuBackend

    seed = int(torch.randint(0, 2**31 - 1, ()))
    folder = save_random(FAMILIES[family](), tmp_path / "f", seed)
    if packed:
        folder = quantize_folder(folder, tmp_path / "q", seed)
    model, ref = load_model(folder, backend=be), load_model(folder, backend=CpuBackend(quant="reference"))
    name = f"{family} {'packed' if packed else 'float'} seed={seed}"
    ids = torch.randint(0, VOCAB, (2, 14))  # batch 2; 11 decode steps run past the sliding window of 5
    eager, replayed = decode_both(model, ids, 3)
    err = (eager - replayed).abs().max().item()
    assert err <= ATOL, f"{name}: replayed vs eager logits differ by {err:.2e}"
    want = ref.forward_logits(ids)[:, 2:].transpose(0, 1)
    assert (replayed - want).abs().max().item() <= ATOL, f"{name}: replayed vs cpu reference"
    # greedy generation: the argmax on the device gives the eager path's tokens, padded batch included
    prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (2, 7)]
    outs = []
    for replay in (False, True):
        model.static_decode = replay
        gen = model.generate(prompts, max_new_tokens=9, stop_ids=[])
        outs.append(gen.tokens)
        assert gen.timings["decode_path"] == ("replayed" if replay else "eager: Model.static_decode is off")
    assert outs[0] == outs[1], name
    # sampling reads the replayed logits back: the same seed gives the eager path's tokens
    model.static_decode = True
    sampled = model.generate(prompts[1], max_new_tokens=6, temperature=0.8, top_k=20, seed=3, stop_ids=[]).tokens
    model.static_decode = False
    assert sampled == model.generate(prompts[1], max_new_tokens=6, temperature=0.8, top_k=20, seed=3, stop_ids=[]).tokens


def test_replay_left_padded_batch_matches_eager(be, tmp_path):
    folder = save_random(FAMILIES["gemma2"](), tmp_path, int(torch.randint(0, 2**31 - 1, ())))
    model = load_model(folder, backend=be)
    ids = torch.randint(0, VOCAB, (3, 12))
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, :3], mask[2, :1] = False, False  # left padding: per-sequence positions and a padding mask
    eager, replayed = decode_both(model, ids, 5, mask)
    assert (eager - replayed).abs().max().item() <= ATOL


def test_replay_after_image_uses_mrope_positions(be, tmp_path):
    """Qwen2.5-VL: after an image the RoPE position of a decoded token is below its cache slot."""
    from PIL import Image
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from llmopt.engine.vision import preprocess_image

    image_token, vstart, vend = 300, 301, 302
    text = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6})
    vision = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64, patch_size=14,
                  window_size=56, fullatt_block_indexes=[0], spatial_merge_size=2, temporal_patch_size=2)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=image_token,
                           vision_start_token_id=vstart, vision_end_token_id=vend, video_token_id=303)
    folder = save_random(Qwen2_5_VLForConditionalGeneration(cfg), tmp_path, int(torch.randint(0, 2**31 - 1, ())), 0.1)
    model = load_model(folder, backend=be)
    image = preprocess_image(Image.fromarray(torch.randint(0, 256, (56, 84, 3), dtype=torch.uint8).numpy()),
                             model.args.vision)
    prompt = torch.tensor([[5, 6, vstart] + [image_token] * image.n_tokens(2) + [vend, 8]])
    follow = torch.randint(0, 300, (6,))
    runs = []
    for replay in (False, True):
        model.static_decode = replay
        logits, state = model.prefill(prompt, images=[image], max_len=prompt.shape[1] + 8)
        assert int(state.next_pos[0]) < state.start  # the case under test
        runs.append(torch.stack([logits] + [model.decode_step(state, follow[t:t + 1]) for t in range(6)]))
    assert (runs[0] - runs[1]).abs().max().item() <= ATOL


def greedy_run(model, prompt, mask, n: int, stop_after: int | None, two_in_flight: bool):
    """Greedy ids of up to ``n`` replayed steps after the prompt, two in flight or one at a time, stopping after
    step ``stop_after``; then two more steps fed other ids than the greedy ones (they must attend to what those
    steps write, never to a slot a dropped step wrote). Returns ids, the state's counters, the two steps' logits."""
    logits, state = model.prefill(prompt, mask, max_len=prompt.shape[1] + n + 2)
    first = logits.argmax(dim=-1)
    if two_in_flight:
        seen = []
        stop = None if stop_after is None else (lambda ids: seen.append(ids) or len(seen) == stop_after)
        ids = model.decode_greedy_steps(state, first, n, stop)
    else:
        ids, token = [], first
        for _ in range(n if stop_after is None else min(n, stop_after)):
            token = model.decode_greedy(state, token)
            ids.append(token)
        ids = torch.stack(ids, dim=1)
    assert state.decode_path == "replayed"
    after = [model.decode_step(state, (ids[:, -1] + 1 + t) % VOCAB) for t in range(2)]
    return ids, (state.start, state.next_pos.clone(), state.valid.clone()), torch.stack(after)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_two_in_flight_matches_one_step_at_a_time(be, tmp_path, family):
    seed = int(torch.randint(0, 2**31 - 1, ()))
    model = load_model(save_random(FAMILIES[family](), tmp_path, seed), backend=be)
    prompt = torch.randint(0, VOCAB, (2, 4))  # batch 2, the first sequence left-padded
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[0, :1] = False
    for n, stop_after in ((7, None), (7, 3), (6, 4), (5, 5), (1, None), (1, 1)):  # odd n; stop mid-run and at the end
        name = f"{family} seed={seed} n={n} stop after {stop_after}"
        (ids, counters, after), (ref_ids, ref_counters, ref_after) = (
            greedy_run(model, prompt, mask, n, stop_after, two) for two in (True, False))
        assert ids.shape == (2, n if stop_after is None else stop_after), name
        assert torch.equal(ids, ref_ids), name
        assert counters[0] == ref_counters[0] and torch.equal(counters[1], ref_counters[1]), name
        assert torch.equal(counters[2], ref_counters[2]), name
        err = (after - ref_after).abs().max().item()
        assert err <= ATOL, f"{name}: steps after the run differ by {err:.2e}"


def test_two_in_flight_generate_stops_like_eager(be, tmp_path):
    """``generate`` (greedy: ``decode_greedy_steps``) with a stop token met mid-run (random models repeat tokens:
    the stop is a token each sequence meets first at its third step or later, or never)."""
    for attempt in range(150):
        if attempt % 30 == 0:  # a random model can settle on one token whatever the prompt: then take another model
            folder = save_random(FAMILIES["qwen2"](), tmp_path / str(attempt), int(torch.randint(0, 2**31 - 1, ())))
            model = load_model(folder, backend=be)
        prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (3, 6)]
        free = model.generate(prompts, max_new_tokens=9, stop_ids=[]).tokens
        late = [t for t in set(free[0][2:] + free[1][2:]) if t not in free[0][:2] + free[1][:2]]
        if late:
            break
    assert late, "no prompt gave a token first met mid-run"
    stops = late[:1]
    outs = []
    for replay in (True, False):
        model.static_decode = replay
        gen = model.generate(prompts, max_new_tokens=9, stop_ids=stops)
        assert gen.timings["decode_path"] == ("replayed" if replay else "eager: Model.static_decode is off")
        outs.append((gen.tokens, gen.finish))
    model.static_decode = True
    assert outs[0] == outs[1]
    assert "stop" in outs[0][1] and min(len(t) for t in outs[0][0]) >= 2
    # stop ids instead of a callable: the run ends once every sequence has produced one
    batch = torch.tensor([[0] * 3 + prompts[0], prompts[1]])
    mask, ids = batch.new_ones(batch.shape, dtype=torch.bool), batch[:, -1]
    mask[0, :3] = False
    for replay in (True, False):
        model.static_decode = replay
        free_run = model.decode_greedy_steps(model.prefill(batch, mask, max_len=16)[1], ids, 8)
        stop_ids = [free_run[0, 1].item(), free_run[1, 3].item()]
        _, state = model.prefill(batch, mask, max_len=16)
        got = model.decode_greedy_steps(state, ids, 8, stop=stop_ids)
        last = max(next(k for k in range(8) if free_run[i, k].item() in stop_ids) for i in range(2))
        assert torch.equal(got, free_run[:, :last + 1]) and state.start == 6 + last + 1, replay
    model.static_decode = True


def test_two_in_flight_bad_input(be, tmp_path):
    model = load_model(save_random(FAMILIES["gemma2"](), tmp_path, 5), backend=be)
    _, state = model.prefill(torch.tensor([[1, 2, 3]]), max_len=6)
    assert model.decode_greedy_steps(state, torch.tensor([4]), 0).shape == (1, 0)
    with pytest.raises(LlmoptError, match="7 tokens exceed the KV cache of 6"):
        model.decode_greedy_steps(state, torch.tensor([4]), 4)
    with pytest.raises(LlmoptError, match=r"token ids must lie in 0\.\.319"):
        model.decode_greedy_steps(state, torch.tensor([-1]), 2)
    assert state.start == 3  # refused runs left the state as it was
    with pytest.raises(ZeroDivisionError):  # an error in stop: the queued step is still waited for
        model.decode_greedy_steps(state, torch.tensor([4]), 3, stop=lambda ids: 1 / 0)
    assert state.start == 4 and model.decode_greedy_steps(state, torch.tensor([4]), 2).shape == (1, 2)


def test_fallbacks_name_their_reason(be, tmp_path):
    from llmopt.backends.cpu import CpuBackend

    folder = save_random(FAMILIES["qwen2"](), tmp_path, 7)
    split = load_model(folder, backends={"vulkan": be, "cpu": CpuBackend()},
                       plan={"segments": [{"layers": [0, 1], "device": "vulkan"}, {"layers": [2, 3], "device": "cpu"}]})
    gen = split.generate([[4, 5, 6]], max_new_tokens=3, stop_ids=[])
    assert gen.timings["decode_path"] == "eager: the plan spans backends ['cpu', 'vulkan'], a replayed step needs one"
    cpu = load_model(folder, backend=CpuBackend())
    assert cpu.generate([[4, 5, 6]], max_new_tokens=3, stop_ids=[]).timings["decode_path"] == "eager"
    model = load_model(folder, backend=be)
    assert gen.tokens == model.generate([[4, 5, 6]], max_new_tokens=3, stop_ids=[]).tokens


def test_bad_input_and_cache_overflow(be, tmp_path):
    model = load_model(save_random(FAMILIES["gemma3"](), tmp_path, 3), backend=be)
    _, state = model.prefill(torch.tensor([[1, 2, 3]]), max_len=5)
    model.decode_step(state, torch.tensor([4]))
    assert state.decode_path == "replayed"
    with pytest.raises(LlmoptError, match=r"token ids must lie in 0\.\.319, got 320\.\.320"):
        model.decode_step(state, torch.tensor([VOCAB]))
    with pytest.raises(LlmoptError, match="2 token ids for a batch of 1"):
        model.decode_step(state, torch.tensor([1, 2]))
    model.decode_greedy(state, torch.tensor([5]))
    with pytest.raises(LlmoptError, match="6 tokens exceed the KV cache of 5"):
        model.decode_step(state, torch.tensor([6]))
    assert state.start == 5  # the refused steps left the state as it was


def test_recording_is_isolated_and_freed(be, tmp_path):
    """Two states decode interleaved, one replayed and one eager, on one backend; closing frees what was made."""
    model = load_model(save_random(FAMILIES["gemma2"](), tmp_path, 11), backend=be)
    ids = torch.randint(0, VOCAB, (1, 10))
    model.static_decode = False
    _, ref_state = model.prefill(ids[:, :3], max_len=10)
    ref = [model.decode_step(ref_state, ids[:, t]) for t in range(3, 10)]
    _, a = model.prefill(ids[:, :3], max_len=10)
    _, b = model.prefill(ids[:, :3], max_len=10)
    for t in range(3, 10):
        model.static_decode = True  # the path is chosen at a state's first decode step
        la = model.decode_step(a, ids[:, t])
        model.static_decode = False
        lb = model.decode_step(b, ids[:, t])  # eager work between replays
        assert (la - ref[t - 3]).abs().max() <= ATOL and (lb - ref[t - 3]).abs().max() <= ATOL
    assert a.decode_path == "replayed" and b.decode_path.startswith("eager")

    def kv(state):
        return sum(c.nbytes for cache in state.caches.values() for c in cache.k + cache.v + [cache.counters])

    dev, kv_a, kv_b = be.dev, kv(a), kv(b)
    sets = sum(len(p.descriptor_sets) for p in dev.pipelines.values())
    mid = dev.bytes_allocated
    del b  # the eager state's KV cache goes with it
    assert dev.bytes_allocated == mid - kv_b
    a.replay.close()  # the recording's buffers and descriptor sets go; a's KV cache stays with a
    after = dev.bytes_allocated
    assert after < mid - kv_b and sum(len(p.descriptor_sets) for p in dev.pipelines.values()) < sets
    del a
    assert dev.bytes_allocated == after - kv_a
    # a server's requests: each records a step and drops it with its state; memory and descriptor pools stay flat
    model.static_decode = True
    model.generate([[1, 2, 3]], max_new_tokens=4, stop_ids=[])
    held, pools = dev.bytes_allocated, len(dev.descriptor_pools)
    for _ in range(5):
        assert model.generate([[1, 2, 3]], max_new_tokens=4, stop_ids=[]).timings["decode_path"] == "replayed"
    assert dev.bytes_allocated == held and len(dev.descriptor_pools) == pools


def test_device_refuses_uploads_and_submits_inside_a_recording(be):
    x = be.from_host(torch.randn(1, 1, 8))
    be.dev.begin_recording()
    with pytest.raises(LlmoptError, match="upload while recording a replayable step"):
        be.from_host(torch.randn(1, 1, 8))
    with pytest.raises(LlmoptError, match="submit while recording a replayable step"):
        be.to_host(x)
    be.dev.abort_recording()
    assert torch.equal(be.to_host(be.add(x, x)), 2 * be.to_host(x))  # normal recording works again


@pytest.mark.real_model
def test_real_gemma3_270m_replay_matches_eager(be, reference_model_dir):
    model = load_model(reference_model_dir, backend=be)
    prompt = model.tokenizer.encode("The history of the city of Rome begins")
    outs = []
    for replay in (False, True):
        model.static_decode = replay
        logits, state = model.prefill([prompt], max_len=len(prompt) + 4)
        tokens, steps = [int(logits.argmax())], []
        for _ in range(3):  # each step reads the 671 MB float32 head: ~3 s on lavapipe
            steps.append(model.decode_step(state, torch.tensor(tokens[-1:])))
            tokens.append(int(steps[-1].argmax()))
        assert state.decode_path == ("replayed" if replay else "eager: Model.static_decode is off")
        outs.append((tokens, torch.stack(steps)))
    assert outs[0][0] == outs[1][0]
    assert (outs[0][1] - outs[1][1]).abs().max().item() <= 3e-3  # the real-model tolerance of test_vulkan_models

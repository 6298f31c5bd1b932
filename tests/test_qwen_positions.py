"""M-RoPE positions on the merged (Qwen-VL) families beyond the image cases of
test_qwen_vl.py: vLLM's own video pruning (``--video-pruning-rate``, EVS)
alongside HIVTP, and positions past the prompt's length against the
rotary table.

Videos pruned by vLLM, images by the plugin, in one prompt, in one server.

The reference is vLLM itself: the same checkpoint and request served
without video pruning gives every token's unpruned position (vLLM's
unpruned positions equal transformers', see test_qwen_vl.py), and vLLM's
``compute_retention_mask`` on the tower's output says which video tokens
its pruning keeps. With both prunings on, the language model must get the
unpruned positions at every text token, every kept image token and every
kept video token, across prefill chunks, and decode where it would unpruned.
"""

from __future__ import annotations

import gc

import pytest
import torch

from hivtp_vllm import mrope
from hivtp_vllm.families import FAMILIES, TINY_IMAGE_TOKENS
from hivtp_vllm.pruning import num_retained
from hivtp_vllm.tools.local_server import image_data_url, in_process_llm
from tests.conftest import QWEN_ARCHS
from tests.count_contract import FAMILIES as CONTRACT
from tests.helpers import chat_with_video, noise, prompt_tokens, video_data_url
from tests.runners import RUNNERS, assert_runs

MAX_LEN = 4096
RATE = 0.5  # vLLM's --video-pruning-rate
FRAMES, FRAME_SIZE = 8, (112, 112)
IMAGE_SIZE = (448, 224)


@pytest.fixture(scope="module")
def arch(qwen_arch) -> str:
    return qwen_arch


def engine_options(arch: str) -> dict:
    """in_process_llm's options the family needs: its dtype (float32, or
    bfloat16 where vLLM's CPU kernels take nothing else: Qwen3.5)."""
    return {"dtype": FAMILIES[arch].dtype}


def timestamped_frames(arch: str) -> bool:
    """Whether the family's video frames are separated by timestamps
    (Qwen3-VL's video processor, which Qwen3-VL-MoE and Qwen3.5 share):
    vLLM's video pruning then lays a run out frame by frame."""
    return FAMILIES[arch].checkpoint.video_processor == "Qwen3VLVideoProcessor"


def messages(video: str, image: str) -> list[dict]:
    content = [
        {"type": "video_url", "video_url": {"url": video}},
        {"type": "text", "text": "Then this image."},
        {"type": "image_url", "image_url": {"url": image}},
        {"type": "text", "text": "What happens?"},
    ]
    return [{"role": "user", "content": content}]


# A raw prompt whose last tokens are an image's (no <|vision_end|> after it).
ENDS_IN_IMAGE = {
    "prompt": "<|im_start|>user\nDescribe this.<|vision_start|><|image_pad|>",
    "multi_modal_data": {"image": [noise(92, *IMAGE_SIZE)]},
}


def _install_recorders(model) -> None:
    """Record the positions the language model gets, the video tower's
    unpruned output and the image rows the model emits, for one request."""
    records = {"positions": [], "videos": [], "images": []}
    if hasattr(model, "test_records"):  # installed by an earlier request: start afresh
        for kept in model.test_records.values():
            kept.clear()
        return
    model.test_records = records

    def before_lm(_module, args, kwargs):
        positions = kwargs["positions"] if "positions" in kwargs else args[0]
        records["positions"].append(positions.detach().cpu().clone())

    model.language_model.model.layers[0].register_forward_pre_hook(before_lm, with_kwargs=True)
    process_video, embed_images = model._process_video_input, model.hivtp_embed_images

    def videos(video_input):
        out = process_video(video_input)
        records["videos"].append(
            ([e.detach().cpu().clone() for e in out], video_input["video_grid_thw"].tolist())
        )
        return out

    def images(image_input, plans):
        out = embed_images(image_input, plans)
        records["images"] += [e.detach().cpu().clone() for e in out]
        return out

    model._process_video_input = videos
    model.hivtp_embed_images = images


def _serve(llm, msgs, kwargs):
    """(prompt ids, prefill positions [3, N], decode position [3], records).

    ``msgs`` are chat messages, or a raw prompt as ``LLM.generate`` takes it.
    """
    from vllm import SamplingParams

    llm.apply_model(_install_recorders)
    sampling = SamplingParams(max_tokens=2, temperature=0.0)
    if isinstance(msgs, dict):
        request = {**msgs, "mm_processor_kwargs": kwargs} if kwargs else msgs
        (out,) = llm.generate(request, sampling, use_tqdm=False)
    else:
        (out,) = llm.chat(msgs, sampling, mm_processor_kwargs=kwargs, use_tqdm=False)
    (records,) = llm.apply_model(lambda m: {k: list(v) for k, v in m.test_records.items()})
    ids = list(out.prompt_token_ids)
    chunks, total = [], 0
    for positions in records["positions"]:  # the prefill may come in several chunks
        if total == len(ids):
            break
        chunks.append(positions)
        total += positions.shape[-1]
    assert total == len(ids)
    decode = records["positions"][len(chunks)][:, 0]
    records["chunks"] = len(chunks)
    return ids, torch.cat(chunks, dim=1), decode, records


def unpruned_index(arch, config, full_ids, ids, kept_image, kept_video, frame_tokens):
    """For each token of the pruned prompt, its index in the unpruned one.

    Walks both prompts: text tokens pair up; the image's slots are its kept
    tokens; the video's are its kept tokens (Qwen2.5-VL), or, for Qwen3-VL
    and the families with its timestamped frames, the run vLLM's video
    pruning lays out from the first frame's tokens on: each frame's kept
    tokens, ``<|vision_end|>``, the next frame's timestamp and
    ``<|vision_start|>``.
    """
    out, a, b = [], 0, 0
    while b < len(ids):
        token = ids[b]
        if token == config.image_token_id:
            out += [a + k for k in kept_image]
            b += len(kept_image)
            while a < len(full_ids) and full_ids[a] == token:
                a += 1
        elif token == config.video_token_id:
            layout = []
            for f in range(len(kept_video) // frame_tokens):
                frame = kept_video[f * frame_tokens : (f + 1) * frame_tokens]
                layout += [a + k for k in frame.nonzero().flatten().tolist()]
                a += frame_tokens
                if timestamped_frames(arch):  # the text up to the next frame's tokens
                    last = f == len(kept_video) // frame_tokens - 1
                    while a < len(full_ids) and full_ids[a] != config.video_token_id:
                        layout.append(a)
                        a += 1
                        if last:
                            break
            out += layout
            b += len(layout)
        else:
            assert full_ids[a] == token, (a, b)
            out.append(a)
            a, b = a + 1, b + 1
    assert a == len(full_ids)
    return out


# The merged families whose vLLM classes prune videos (Family.video_pruning),
# and those whose classes never set it up (Qwen3.5), where the plugin refuses it.
# (Qwen's rows: GLM's, which vLLM gives no video pruning, are tests/test_glm4v.py's.)
EVS_ARCHS = [name for name in QWEN_ARCHS if FAMILIES[name].video_pruning]
NO_EVS_ARCHS = [name for name in QWEN_ARCHS if not FAMILIES[name].video_pruning]


@pytest.mark.parametrize("arch_", NO_EVS_ARCHS)
def test_video_pruning_is_refused_at_start_where_vllm_never_sets_it_up(tmp_path, arch_):
    """vLLM's Qwen3.5 classes never set up their video pruning (stock stops at
    the first video): the plugin's model refuses the option when it is built,
    naming it, before any request."""
    from hivtp_vllm.tools.checkpoints import make_checkpoint

    ckpt = make_checkpoint(tmp_path / arch_, arch=arch_)
    with pytest.raises(Exception, match="--video-pruning-rate is not supported"):
        with in_process_llm(
            ckpt,
            max_model_len=MAX_LEN,
            limit_mm_per_prompt={"image": 1, "video": 1},
            video_pruning_rate=RATE,
            **engine_options(arch_),
        ):
            pass
    gc.collect()


@pytest.mark.parametrize("arch", EVS_ARCHS)
def test_positions_with_both_prunings_are_the_unpruned_ones(tmp_path, arch):
    from vllm.multimodal.video_prune.evs import (
        compute_retained_tokens_count,
        compute_retention_mask,
    )

    from hivtp_vllm.tools.checkpoints import make_checkpoint

    tiny_qwen = make_checkpoint(tmp_path / arch, arch=arch)

    msgs = messages(video_data_url(90, FRAMES, FRAME_SIZE), image_data_url(91, *IMAGE_SIZE))
    limit = {"image": 1, "video": 1}
    with in_process_llm(
        tiny_qwen, max_model_len=MAX_LEN, limit_mm_per_prompt=limit, **engine_options(arch)
    ) as llm:
        full_ids, want, want_decode, _ = _serve(llm, msgs, None)
        *_, want_end_decode, _ = _serve(llm, ENDS_IN_IMAGE, None)
        (config,) = llm.apply_model(lambda m: m.config)
    # Release the first engine before the second starts: its teardown resets
    # vLLM's process-wide parallel state.
    del llm
    gc.collect()
    # Small chunks: the video and the image reach the model in pieces.
    with in_process_llm(
        tiny_qwen,
        max_model_len=MAX_LEN,
        limit_mm_per_prompt=limit,
        video_pruning_rate=RATE,
        max_num_batched_tokens=24,
        enable_chunked_prefill=True,
        **engine_options(arch),
    ) as llm:
        ids, got, got_decode, records = _serve(llm, msgs, {"hivtp_retain_ratio": 0.25})
        _, end_got, end_decode, _ = _serve(llm, ENDS_IN_IMAGE, {"hivtp_num_tokens": 1})

    assert records["chunks"] > 2
    ((video,), ((t, h, w),)) = records["videos"][-1]
    frame_tokens = h * w // 4
    kept_video = compute_retention_mask(video, (t, h, w), spatial_merge_size=2, q=RATE)
    image_rows = records["images"][-1]
    rows, cols = IMAGE_SIZE[1] // CONTRACT[arch].unit, IMAGE_SIZE[0] // CONTRACT[arch].unit
    fields = mrope.read_channels(image_rows)
    kept_image = (fields[:, 2] * cols + fields[:, 3]).tolist()
    assert len(kept_image) == num_retained(rows * cols, 0.25)
    assert 0 < int(kept_video.sum()) < len(kept_video)
    assert kept_video[frame_tokens:].any()  # kept tokens past the first frame
    # Counts: vLLM's for the video (its processor), the spec's for the image.
    video_kept = compute_retained_tokens_count(frame_tokens, t, RATE)
    assert int(kept_video.sum()) == video_kept
    assert len(full_ids) - len(ids) == (t * frame_tokens - video_kept) + (
        rows * cols - len(kept_image)
    )

    index = unpruned_index(arch, config, full_ids, ids, kept_image, kept_video, frame_tokens)
    assert len(index) == len(ids)
    assert torch.equal(got, want[:, index])
    assert torch.equal(got_decode, want_decode)
    # A prompt that ends in its image's tokens, pruned to one that is not the
    # unpruned run's largest position: decoding still starts after that one.
    assert int(end_got.max()) + 1 < int(want_end_decode[0])
    assert torch.equal(end_decode, want_end_decode)


def test_positions_past_the_prompt_stay_inside_the_rotary_table(tiny_qwen, arch):
    """A pruned image moves the text after it by max(rows, cols) - K past its
    token count. With max_model_len = max_position_embeddings (vLLM's
    default), a long prompt with an elongated image pruned to one token
    reaches positions past max_position_embeddings: served, and decoded up
    to max_model_len. A prompt that could move past the table (4x
    max_position_embeddings, as vLLM sizes it for its own pruning) is
    refused in the processor (a 400 from a server), never in the model."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    limit = 512
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n"
    text += "<|im_start|>assistant\n"
    wide = noise(1, 100 * CONTRACT[arch].unit, 2 * CONTRACT[arch].unit)  # 2 x 100 merged tokens
    with in_process_llm(
        tiny_qwen,
        max_model_len=limit,
        hf_overrides={"text_config": {"max_position_embeddings": limit}},
        limit_mm_per_prompt={"image": 6},
        **engine_options(arch),
    ) as llm:
        (out,) = llm.generate(
            {
                "prompt": text.format("word " * 430),
                "multi_modal_data": {"image": [wide]},
                "mm_processor_kwargs": {"hivtp_num_tokens": 1},
            },
            SamplingParams(max_tokens=limit, ignore_eos=True),
            use_tqdm=False,
        )
        length = len(out.prompt_token_ids)
        # Decoded to the end: the last positions are about 100 past the
        # last token's index, past max_position_embeddings.
        assert length + len(out.outputs[0].token_ids) == limit
        # 2 x 320 merged tokens: at the tiny checkpoints' cap, so not resized
        # (a larger image would be shrunk to it). One token each moves the
        # prompt 6 x 319 past its length: 512 + 1914 > 4 x 512; 64 tokens each,
        # 6 x 256: 512 + 1536 = 4 x 512 fits.
        assert 2 * 320 <= TINY_IMAGE_TOKENS
        tall = [noise(2 + i, 320 * CONTRACT[arch].unit, 2 * CONTRACT[arch].unit) for i in range(6)]
        many = text.format("").replace(
            "<|vision_start|><|image_pad|><|vision_end|>",
            "<|vision_start|><|image_pad|><|vision_end|>" * 6,
        )
        # Twice: the second time vLLM's processor cache has the images.
        for _ in range(2):
            with pytest.raises(VLLMValidationError, match="hivtp_num_tokens") as refused:
                llm.generate(
                    {
                        "prompt": many,
                        "multi_modal_data": {"image": tall},
                        "mm_processor_kwargs": {"hivtp_num_tokens": 1},
                    },
                    SamplingParams(max_tokens=2),
                    use_tqdm=False,
                )
            assert f"{4 * limit} positions" in str(refused.value)
        # Keeping more tokens of the same images is served.
        (out,) = llm.generate(
            {
                "prompt": many,
                "multi_modal_data": {"image": tall},
                "mm_processor_kwargs": {"hivtp_num_tokens": 64},
            },
            SamplingParams(max_tokens=2),
            use_tqdm=False,
        )
        assert len(out.prompt_token_ids) < limit


# -- server -----------------------------------------------------------------


@pytest.fixture(scope="module", params=EVS_ARCHS)
def evs_arch(request) -> str:
    """The merged families whose vLLM class prunes videos. Those whose class
    never sets it up (Qwen3.5) serve videos unpruned next to pruned images:
    tests/test_served_families.py checks that on the family's servers."""
    return request.param


@pytest.fixture(scope="module")
def video_pruning_servers(server_factory, tmp_path_factory, evs_arch):
    """The plugin with vLLM's video pruning, on each runner. Plugin only:
    stock vLLM's V1 runner on the CPU build never calls the position hook,
    so stock with --video-pruning-rate fails on every media request there
    (``vllm_compat.let_cpu_v1_runner_recompute_mrope``)."""
    from hivtp_vllm.tools.checkpoints import make_checkpoint

    arch = evs_arch
    tiny_qwen = make_checkpoint(tmp_path_factory.mktemp(f"evs-{arch}") / "tiny", arch=arch)
    args = (
        "--dtype",  # after local_server's float32: the family's
        FAMILIES[arch].dtype,
        "--max-model-len",
        str(MAX_LEN),
        "--limit-mm-per-prompt",
        '{"image": 1, "video": 1}',
        "--video-pruning-rate",
        str(RATE),
    )
    servers = {
        runner: server_factory(tiny_qwen, *args, runner=runner, wait=False) for runner in RUNNERS
    }
    for runner, server in servers.items():
        server.wait_ready()
        assert_runs(server.log.name, runner)
    yield servers
    for server in servers.values():
        server.stop()


@pytest.mark.server
@pytest.mark.parametrize("runner", RUNNERS)
def test_server_prunes_videos_by_vllm_and_images_by_hivtp(video_pruning_servers, evs_arch, runner):
    """Counts as vLLM's video pruning sets them for the video, as the
    request's hivtp keys set them for the image; bad keys are still a 400."""
    from vllm.multimodal.video_prune.evs import compute_retained_tokens_count

    arch, server = evs_arch, video_pruning_servers[runner]
    video = video_data_url(92, FRAMES, FRAME_SIZE)
    image = image_data_url(93, *IMAGE_SIZE)
    frames = FRAMES // 2  # two frames a temporal patch
    per_frame = (FRAME_SIZE[0] // CONTRACT[arch].unit) * (FRAME_SIZE[1] // CONTRACT[arch].unit)
    kept = compute_retained_tokens_count(per_frame, frames, RATE)
    assert kept < per_frame * frames
    alone = prompt_tokens(chat_with_video(server, video, None, None))
    n = (IMAGE_SIZE[0] // CONTRACT[arch].unit) * (IMAGE_SIZE[1] // CONTRACT[arch].unit)
    for kwargs, image_tokens in (
        (None, n),
        ({"hivtp_retain_ratio": 0.25}, num_retained(n, 0.25)),
        ({"hivtp_num_tokens": 5}, 5),
    ):
        both = prompt_tokens(chat_with_video(server, video, image, kwargs))
        # The image adds its tokens, <|vision_start|>, <|vision_end|>.
        assert both - alone == image_tokens + 2, kwargs
    response = chat_with_video(server, video, image, {"hivtp_retain_ratio": 2})
    assert response.status_code == 400
    # The video alone: vLLM's pruned count, whatever the hivtp keys say.
    assert (
        prompt_tokens(chat_with_video(server, video, None, {"hivtp_retain_ratio": 0.25})) == alone
    )
    assert prompt_tokens(chat_with_video(server, video, None, None)) == alone


@pytest.mark.server
def test_video_pruning_gives_the_same_answer_on_both_runners(video_pruning_servers):
    """A pruned video next to a pruned image: the same prompt and greedy
    tokens on V1 and V2 (positions placed by each runner's hook)."""
    video = video_data_url(94, FRAMES, FRAME_SIZE)
    image = image_data_url(95, *IMAGE_SIZE)
    answers = {}
    for runner, server in video_pruning_servers.items():
        response = chat_with_video(server, video, image, {"hivtp_retain_ratio": 0.25})
        assert response.status_code == 200, response.text
        body = response.json()
        answers[runner] = (body["usage"], body["choices"][0]["message"]["content"])
    assert answers["V1"] == answers["V2"]

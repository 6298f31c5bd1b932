"""Small helpers the per-family test modules share."""

from __future__ import annotations

import base64
import io

import numpy as np
import requests
from PIL import Image


def noise(seed: int, width: int, height: int) -> Image.Image:
    """A random-noise RGB image (deterministic per seed)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8"))


def ok(response) -> dict:
    """The body of a response that must be a 200."""
    assert response.status_code == 200, response.text
    return response.json()


def prompt_tokens(response) -> int:
    """``usage.prompt_tokens`` of a chat response that must be a 200."""
    return ok(response)["usage"]["prompt_tokens"]


def assert_refused(response, key: str) -> dict:
    """A 400 that names ``key`` (the parameter and the message); its error."""
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == key, error
    assert key in error["message"], error
    return error


def process_one(processor, image: Image.Image, kwargs: dict | None):
    """vLLM's processor ``apply`` on one image: (placeholder length, its mm kwargs item)."""
    from vllm.multimodal.processing import ProcessorInputs
    from vllm.multimodal.processing.context import TimingContext

    token_id = processor.info.get_hf_config().image_token_index
    inputs = ProcessorInputs(
        prompt=[1, token_id, 5],
        mm_data_items=processor.info.parse_mm_data({"image": [image]}),
        hf_processor_mm_kwargs=kwargs or {},
    )
    result = processor.apply(inputs, TimingContext(enabled=False))
    (placeholder,) = result["mm_placeholders"]["image"]
    return placeholder.length, result["mm_kwargs"]["image"][0]


def stock_and_pruned(llm, pixel_values, image_sizes, fields):
    """In the loaded model: stock and pruned embeddings of anyres images, the
    newline embedding, and vLLM's scores of the first image's tiles."""
    import torch

    def run(model):
        stock = model.embed_multimodal(pixel_values=pixel_values, image_sizes=image_sizes)
        pruned = model.embed_multimodal(
            pixel_values=pixel_values, image_sizes=image_sizes, **fields
        )
        tiles = pixel_values[0].to(model.vision_tower.dtype)
        with model.hivtp_recorder.recording(torch.arange(tiles.shape[0])):
            model._image_pixels_to_features(model.vision_tower, tiles)
        scores = model.hivtp_recorder.patch_scores().cpu()
        stock = [s.cpu() for s in stock]
        return stock, [p.cpu() for p in pruned], model.image_newline.cpu(), scores

    ((result),) = llm.apply_model(run)
    return result


def anyres_index(base_kept, highres_kept, height: int, width: int, base: int):
    """Rows of the stock layout (base view, then H' rows of W' tokens and a
    newline each) that the kept tokens of both views occupy."""
    import torch

    layout = torch.zeros(height, width + 1, dtype=torch.bool)
    layout[highres_kept // max(width, 1), highres_kept % max(width, 1)] = True
    layout[:, width] = True
    return torch.cat([base_kept, base + layout.view(-1).nonzero().squeeze(1)])


def video_data_url(seed: int, frames: int = 4, size=(384, 384)) -> str:
    """A short video as vLLM's ``video/jpeg`` data URL (base64 JPEG frames)."""
    rng = np.random.default_rng(seed)
    parts = []
    for _ in range(frames):
        buf = io.BytesIO()
        pixels = (rng.random((size[1], size[0], 3)) * 255).astype("uint8")
        Image.fromarray(pixels).save(buf, format="JPEG")
        parts.append(base64.b64encode(buf.getvalue()).decode())
    return "data:video/jpeg;base64," + ",".join(parts)


def chat_with_video(
    server, video: str, image: str | None, kwargs: dict | None
) -> requests.Response:
    return media_chat(server, [image] if image else [], kwargs, video=video, text="What happens?")


def media_chat(
    server,
    images: list[str],
    kwargs: dict | None,
    *,
    video: str | None = None,
    text: str = "What is in the picture?",
    **extra: object,
) -> requests.Response:
    """A greedy chat request: the video (if any), the images, then the text."""
    content = [{"type": "video_url", "video_url": {"url": video}}] if video else []
    content += [{"type": "image_url", "image_url": {"url": url}} for url in images]
    content.append({"type": "text", "text": text})
    body = {
        "model": server.model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 6,
        "temperature": 0.0,
        **extra,
    }
    if kwargs is not None:
        body["mm_processor_kwargs"] = kwargs
    return requests.post(server.url + "/v1/chat/completions", json=body, timeout=300)


def install_recorders(model) -> bool:
    """For ``LLM.apply_model``: record the positions the language model gets
    and what ``embed_multimodal`` emits (``model.test_records``)."""
    records = {"positions": [], "embeds": []}
    model.test_records = records

    def before_lm(_module, args, kwargs):
        positions = kwargs["positions"] if "positions" in kwargs else args[0]
        records["positions"].append(positions.detach().cpu().clone())

    # The first decoder layer: vLLM's compiled model class skips module hooks.
    # Every layer gets the positions, a hybrid LM's linear-attention ones too
    # (Qwen3.5's layer 0: vLLM's Qwen3NextModel passes positions= to each).
    model.language_model.model.layers[0].register_forward_pre_hook(before_lm, with_kwargs=True)
    original = model.embed_multimodal

    def embed(**kwargs):
        out = original(**kwargs)
        records["embeds"].append([e.detach().cpu().clone() for e in out])
        return out

    model.embed_multimodal = embed
    return True


def assert_videos_keep_their_layout(apply, processor, image_tokens) -> None:
    """hivtp keys prune the image, never the video beside it: the video's
    placeholders are the same with and without them. ``apply(processor,
    images, kwargs, videos=...)`` runs the module's processor on its prompt;
    ``image_tokens(width, height)`` is an image's unpruned token count."""
    from hivtp_vllm.pruning import num_retained

    frames = (np.random.default_rng(0).random((4, 112, 112, 3)) * 255).astype("uint8")
    metadata = {
        "fps": 2.0,
        "duration": 2.0,
        "total_num_frames": 4,
        "frames_indices": [0, 1, 2, 3],
        "video_backend": "opencv",
        "do_sample_frames": False,
    }
    video = (frames, metadata)
    plain = apply(processor, [noise(1, 448, 336)], None, videos=[video])
    pruned = apply(processor, [noise(1, 448, 336)], {"hivtp_retain_ratio": 0.25}, videos=[video])
    lengths = [[p.length for p in r["mm_placeholders"]["video"]] for r in (plain, pruned)]
    assert lengths[0] == lengths[1] and lengths[0][0] > 0
    assert pruned["mm_placeholders"]["image"][0].length == num_retained(
        image_tokens(448, 336), 0.25
    )


def run_recorded(llm, images, kwargs, prompt):
    """One greedy request through an engine with :func:`install_recorders`:
    (pruned prompt ids, prefill positions, decode positions, emitted embeddings)."""
    from vllm import SamplingParams

    llm.apply_model(lambda m: m.test_records.update(positions=[], embeds=[]))
    (out,) = llm.generate(
        {"prompt": prompt, "multi_modal_data": {"image": images}, "mm_processor_kwargs": kwargs},
        SamplingParams(max_tokens=2, temperature=0.0),
        use_tqdm=False,
    )
    ((positions, embeds),) = llm.apply_model(
        lambda m: (m.test_records["positions"], m.test_records["embeds"])
    )
    ids = list(out.prompt_token_ids)
    at = next(i for i, p in enumerate(positions) if p.shape[-1] == len(ids))
    return ids, positions[at], positions[at + 1], embeds[-1]


def kept_tokens(embeds, cols: int):
    """Flat raster indices of an image's emitted tokens, from their position columns."""
    from hivtp_vllm import mrope

    fields = mrope.read_channels(embeds)
    return fields[:, 2] * cols + fields[:, 3]


def process(processor, prompt: list[int], images, kwargs=None, videos=None) -> dict:
    """vLLM's multimodal processor on a token-id prompt with its images (and videos)."""
    from vllm.multimodal.processing import ProcessorInputs
    from vllm.multimodal.processing.context import TimingContext

    data: dict = {"image": images}
    if videos:
        data["video"] = videos
    inputs = ProcessorInputs(
        prompt=prompt,
        mm_data_items=processor.info.parse_mm_data(data),
        hf_processor_mm_kwargs=kwargs or {},
    )
    return processor.apply(inputs, TimingContext(enabled=False))


# Image sizes the merged families' processor tests count: 4:3, 33:1, under the
# lower pixel bound, over the upper; and the options each is counted under.
MERGED_PROCESSOR_SIZES = ((448, 336), (1000, 30), (13, 7), (4000, 3000))
PAD_OPTIONS = [
    None,
    {"hivtp_retain_ratio": 1.0},
    {"hivtp_retain_ratio": 0.5},
    {"hivtp_retain_ratio": 0.25},
    {"hivtp_num_tokens": 3},
    {"hivtp_retain_ratio": 0.25, "hivtp_selection": "uniform"},
]


def assert_pads_per_image(apply, processor, image_tokens, kwargs) -> list:
    """Each image of MERGED_PROCESSOR_SIZES gets the spec's count of pads
    under ``kwargs``, in its placeholder, the prompt and the plan, and the
    plan's grid holds the unpruned count. Returns the items' ``mm_kwargs``
    for a family's own checks."""
    from hivtp_vllm.pruning import num_retained

    sizes = MERGED_PROCESSOR_SIZES
    images = [noise(i, w, h) for i, (w, h) in enumerate(sizes)]
    result = apply(processor, images, kwargs)
    counts = [image_tokens(w, h) for w, h in sizes]
    if kwargs and "hivtp_num_tokens" in kwargs:
        want = [kwargs["hivtp_num_tokens"]] * len(sizes)
    else:
        want = [num_retained(n, (kwargs or {}).get("hivtp_retain_ratio", 1.0)) for n in counts]
    assert [p.length for p in result["mm_placeholders"]["image"]] == want
    pad = processor.info.get_hf_config().image_token_id
    assert result["prompt_token_ids"].count(pad) == sum(want)
    items = result["mm_kwargs"]["image"]
    assert [int(item["hivtp_num_keep"].data[0]) for item in items] == want
    grids = [tuple(item["hivtp_grids"].data[0].tolist()) for item in items]
    assert [r * c for r, c in grids] == counts
    return items


def assert_pruned_prompt(
    full_ids, ids, image_token, grids, scores, stock, pruned, ratio, want, prefill, decode
) -> None:
    """A pruned M-RoPE prompt against its unpruned run (same images): each
    image keeps the spec's selection on ``scores`` (vLLM's, per image in
    raster order), its kept embeddings are the unpruned ones at the kept
    tokens, every pruned-prompt token sits at its unpruned position in
    ``want`` (the unpruned prompt's positions), and decoding starts after the
    unpruned prompt. ``stock``/``pruned``: the emitted embeddings of each run."""
    import torch

    from hivtp_vllm import mrope
    from hivtp_vllm.pruning import num_retained, select_tokens

    per_image = scores.split([rows * cols for rows, cols in grids])
    starts = [i for i, t in enumerate(full_ids) if t == image_token and full_ids[i - 1] != t]
    unpruned_index = []  # pruned prompt position -> unpruned prompt position
    cursor, image = 0, -1
    for j, token in enumerate(ids):
        if token == image_token:
            if j == 0 or ids[j - 1] != image_token:
                image += 1
                rows, cols = grids[image]
                kept = kept_tokens(pruned[image], cols)
                # The kept tokens are the spec's selection on vLLM's scores
                # (near-ties may order apart in the last float bits against
                # another implementation's, so the exact check is on vLLM's).
                k = num_retained(rows * cols, ratio)
                assert len(kept) == k
                assert torch.equal(kept, select_tokens(per_image[image].view(rows, cols), k))
                # Kept embeddings are the unpruned ones at the kept tokens.
                width = -mrope.CHANNELS
                assert torch.equal(pruned[image][:, :width], stock[image][:, :width][kept])
                unpruned_index += (starts[image] + kept).tolist()
                cursor = starts[image] + rows * cols
        else:
            while full_ids[cursor] != token:
                cursor += 1
            unpruned_index.append(cursor)
            cursor += 1
    assert len(unpruned_index) == len(ids)
    assert torch.equal(prefill, want[:, unpruned_index])
    assert torch.equal(decode[:, 0], want.max() + 1 + torch.zeros(3, dtype=torch.long))

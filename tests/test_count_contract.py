"""Property tests of the count contract (tests/count_contract.py), per family.

For each drawn image size and request: the processor either refuses with a
400 naming the key, or its placeholder count equals the embeddings that the
loaded vLLM model emits for the plan it wrote; with no pruning, the count is
stock vLLM's own. The model is a real in-process vLLM engine on a tiny
random checkpoint; only the tower's outputs are random.
"""

from __future__ import annotations

import inspect

import pytest
from hypothesis import HealthCheck, example, given, settings

import hivtp_vllm
from hivtp_vllm import contract
from hivtp_vllm.tools.local_server import in_process_llm
from tests.count_contract import EXTREME_SIZES, FAMILIES, image_sizes, request_options

pytestmark = pytest.mark.server

# Drawn cases per (family, pinpoints), beside the extreme shapes' explicit
# examples: 500 reach every kind of outcome (the asserts below), and the
# largest anyres config takes about 40 s of CI (1,500 took two minutes).
CASES = 500


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """Per family, (processing info, loaded model), made on first use and kept."""
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY

    from hivtp_vllm.tools.checkpoints import make_checkpoint

    hivtp_vllm.register()
    cache: dict[str, tuple] = {}
    engines = []

    def get(name: str) -> tuple:
        if name not in cache:
            family = FAMILIES[name]
            ckpt = make_checkpoint(tmp_path_factory.mktemp(name) / "tiny", arch=family.name)
            info = MULTIMODAL_REGISTRY.create_processor(
                ModelConfig(model=str(ckpt), max_model_len=family.max_model_len)
            ).info
            # What the tests derive from the family's row is what make-model built.
            hf_config = info.get_hf_config()
            vision = hf_config.vision_config
            if family.layout == "merged":
                assert vision.patch_size * vision.spatial_merge_size == family.unit
                bounds = info.get_image_processor().size
                assert (bounds["shortest_edge"], bounds["longest_edge"]) == family.pixel_bounds
            else:
                assert vision.image_size // vision.patch_size == family.side
                assert getattr(hf_config, "image_grid_pinpoints", None) == family.own_pinpoints
            engine = in_process_llm(ckpt, max_model_len=family.max_model_len)
            llm = engine.__enter__()
            engines.append(engine)
            (model,) = llm.apply_model(lambda m: m)
            cache[name] = (info, model)
        return cache[name]

    yield get
    for engine in engines:
        engine.__exit__(None, None, None)


# (family, pinpoints): a family's own checkpoint (its own grids, "own"), and
# for anyres families another grid set that stresses the layout.
CONFIGS = [
    (name, grid)
    for name, family in FAMILIES.items()
    for grid in (list(family.pinpoints) or list(family.processor_variants) or ["own"])
]


def set_pinpoints(info, model, pinpoints) -> None:
    """Serve a set of grids: the processor's and the model's config."""
    info.get_hf_config().image_grid_pinpoints = pinpoints
    model.config.image_grid_pinpoints = pinpoints


seen_uniform: list[int] = []


def check_case(
    info, family, model, width: int, height: int, options: dict | None, mm_kwargs=None
) -> str:
    """One case of the contract; returns what happened, for the statistics.
    ``mm_kwargs``: the processor options of the config (Gemma 3's pan-and-scan)."""
    mm_kwargs = mm_kwargs or {}
    from vllm.exceptions import VLLMValidationError

    request = info.hivtp_request(options or {})
    if family.layout == "merged":  # Qwen-VL, GLM
        # Qwen-VL's count takes the image processor and the request's
        # kwargs; GLM's (vllm glm4_1v.py) the size alone.
        takes = inspect.signature(info.get_num_image_tokens).parameters
        extra = (
            {"image_processor": info.get_image_processor(), "mm_kwargs": {}}
            if "mm_kwargs" in takes
            else {}
        )
        try:
            stock = info.get_num_image_tokens(image_width=width, image_height=height, **extra)
        except ValueError:
            # An aspect ratio over 200: vLLM refuses the image (a 400, stock
            # and plugin alike, tests/test_served_families.py); so does the count.
            with pytest.raises(ValueError, match="aspect ratio"):
                info.hivtp_layout(image_width=width, image_height=height)
            return "refused by vLLM"
    elif "processor" in inspect.signature(info.get_num_image_tokens).parameters:  # Gemma 3
        stock = info.get_num_image_tokens(
            image_width=width,
            image_height=height,
            processor=info.get_hf_processor(),
            mm_kwargs=mm_kwargs,
        )
    else:
        stock = info.get_num_image_tokens(image_width=width, image_height=height)
    layout = info.hivtp_layout(image_width=width, image_height=height, mm_kwargs=mm_kwargs)
    # The views and newlines add up to vLLM's own count.
    assert layout.tokens == stock, (width, height, layout)
    try:
        placeholders = info.get_num_pruned_tokens(
            image_width=width, image_height=height, request=request, mm_kwargs=mm_kwargs
        )
        plan = info.hivtp_plan(
            image_width=width, image_height=height, request=request, mm_kwargs=mm_kwargs
        )
    except VLLMValidationError as exc:
        # Only a budget outside [non-empty views, grid tokens] is refused,
        # with the key, the value and the range, and no internal name.
        budget = (options or {}).get("hivtp_num_tokens")
        assert budget is not None, (width, height, options, exc)
        low = sum(1 for n in layout.sizes if n > 0)
        assert budget < low or budget > sum(layout.sizes), (width, height, options, exc)
        assert exc.parameter == "hivtp_num_tokens" and "hivtp_num_tokens" in str(exc)
        assert f"[{low}, {sum(layout.sizes)}]" in str(exc)
        assert "num_keep" not in str(exc) and "num_tokens must" not in str(exc)
        return "400"
    assert plan.tokens == placeholders
    if not request.prunes:
        assert placeholders == stock
    # Empty views keep nothing; others keep at least one token.
    assert all((k == 0) == (n == 0) for k, n in zip(plan.keep, layout.sizes, strict=True))
    (sent,) = contract.pop_plans(dict(contract.to_fields([plan])))
    assert sent == plan  # the fields carry the plan intact
    emitted = family.emit(model, sent, width, height, mm_kwargs)
    assert emitted.shape[0] == placeholders, (width, height, options, plan)
    assert plan.uniform == ((options or {}).get("hivtp_selection") == "uniform")
    empty = any(n == 0 for n in layout.sizes)
    kind = "pruned" if plan.prunes else "full"
    if plan.prunes and plan.uniform:
        seen_uniform.append(1)
    return kind + (" empty-view" if empty else "")


@pytest.mark.parametrize(("name", "pinpoints"), CONFIGS, ids=[f"{n}-{p}" for n, p in CONFIGS])
def test_placeholders_equal_emitted_embeddings(loaded, name, pinpoints):
    family = FAMILIES[name]
    info, model = loaded(name)
    if family.pinpoints:  # set each time: another case may have served other grids
        set_pinpoints(info, model, family.pinpoints[pinpoints])
    mm_kwargs = family.processor_variants.get(pinpoints, {})
    seen: dict[str, int] = {}
    seen_uniform.clear()

    @settings(
        max_examples=CASES,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(size=image_sizes(), options=request_options())
    def contract_holds(size, options):
        outcome = check_case(info, family, model, *size, options, mm_kwargs)
        seen[outcome] = seen.get(outcome, 0) + 1

    for size in EXTREME_SIZES:
        contract_holds = example(size=size, options={"hivtp_num_tokens": 3})(contract_holds)
        contract_holds = example(size=size, options={"hivtp_retain_ratio": 0.1})(contract_holds)
        contract_holds = example(size=size, options=None)(contract_holds)
    contract_holds()
    print(f"{family.title} / {pinpoints}: {sum(seen.values())} cases, {seen}")
    # The draw reaches every kind of outcome, so the test is not vacuous.
    assert seen.get("pruned", 0) > CASES // 4 and seen.get("400", 0) > 0
    assert len(seen_uniform) > CASES // 10  # the uniform baseline is drawn too
    empty = seen.get("pruned empty-view", 0) + seen.get("full empty-view", 0)
    assert (empty > 0) == family.empty_views, seen

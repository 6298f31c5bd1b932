"""Pruning under tensor parallelism: every worker selects what one worker would.

Two levels:

- two processes joined by torch.distributed (gloo) through vLLM's own
  tensor-parallel group run the plugin's real code path, the model mixin's
  tower call, ``build_recorder``'s all-reduce and ``sharded_batch``'s
  all-gather, on a CLIP-shaped stand-in tower whose band receives fixed query
  and key tensors, in both of vLLM's encoder modes; each worker's scores and
  selection are compared with one worker's (and without the reduction they
  differ, so the check can fail);
- real vLLM servers (CPU build, ``--tensor-parallel-size 2``, each worker
  bound to its own core) answer the same requests as a one-worker server: the
  same ``prompt_tokens``, the same greedy tokens and, since a random-weight
  model's greedy tokens hardly depend on the image, the same log-probabilities
  of the prompt and of the answer.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from hivtp_vllm.pruning import select_tokens
from hivtp_vllm.scoring import ReceivedAttention
from hivtp_vllm.tools.local_server import image_data_url

WORLD = 2
HEADS, HEAD_DIM, LAYERS = 4, 8, 3
SIDE = 12  # 12 x 12 patches, plus CLS
SEQ = SIDE * SIDE + 1
KEEP = 36  # r = 0.25
BAND = {"hivtp_layer_start": 1, "hivtp_num_layers": 2}


class _Attention(nn.Module):
    """Stands for vLLM's encoder attention, called as ``attn(q, k, v)``."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        return value


class _SelfAttention(nn.Module):
    """What ``build_recorder`` reads of vLLM's ``CLIPAttention``."""

    def __init__(self, local_heads: int) -> None:
        super().__init__()
        self.num_heads = HEADS
        self.num_heads_per_partition = local_heads
        self.scale = HEAD_DIM**-0.5
        self.attn = _Attention()


class _Tower(nn.Module):
    """A CLIP-shaped tower: ``vision_model.encoder.layers[i].self_attn``.

    Its input holds each image's query and key per layer,
    ``[B, LAYERS, 2, SEQ, HEADS * HEAD_DIM]``; a worker that holds a slice
    of the heads (``rank`` set) feeds its attention modules that slice, as
    vLLM's ``QKVParallelLinear`` would.
    """

    def __init__(self, local_heads: int, rank: int | None) -> None:
        super().__init__()
        self.vision_model = nn.Module()
        self.vision_model.encoder = nn.Module()
        self.vision_model.encoder.layers = nn.ModuleList(nn.Module() for _ in range(LAYERS))
        for layer in self.vision_model.encoder.layers:
            layer.self_attn = _SelfAttention(local_heads)
        self.rank = rank
        self.images_seen: list[int] = []

    def forward(self, qk: torch.Tensor) -> torch.Tensor:
        self.images_seen.append(qk.shape[0])
        for i, layer in enumerate(self.vision_model.encoder.layers):
            query, key = qk[:, i, 0], qk[:, i, 1]
            if self.rank is not None:
                width = layer.self_attn.num_heads_per_partition * HEAD_DIM
                cols = slice(self.rank * width, (self.rank + 1) * width)
                query, key = query[..., cols], key[..., cols]
            layer.self_attn.attn(query, key, key)
        return qk[:, 0, 0, 1:, :4]  # per-image "features"


def _band_inputs(batch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(batch)
    return torch.randn(batch, LAYERS, 2, SEQ, HEADS * HEAD_DIM, generator=gen)


def _single_worker_scores(qk: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    tower = _Tower(HEADS, None)
    band = [tower.vision_model.encoder.layers[i].self_attn for i in (1, 2)]
    recorder = ReceivedAttention(
        [a.attn for a in band], num_heads=HEADS, total_heads=HEADS, scale=band[0].scale
    )
    with recorder.recording(rows):
        tower(qk)
    return recorder.patch_scores()


def _select(scores: torch.Tensor) -> list[torch.Tensor]:
    return [select_tokens(s.view(SIDE, SIDE), KEEP) for s in scores]


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    """One tensor-parallel worker: vLLM's groups over gloo, the plugin's code."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed.parallel_state import (
        init_distributed_environment,
        initialize_model_parallel,
    )

    from hivtp_vllm import params
    from hivtp_vllm.models.common import HivtpModelMixin, build_recorder

    init_distributed_environment(WORLD, rank, f"file://{init_file}", rank, backend="gloo")
    with set_current_vllm_config(VllmConfig()):
        initialize_model_parallel(tensor_model_parallel_size=WORLD, backend="gloo")

    class Base:
        def _image_pixels_to_features(self, vision_tower, pixel_values):
            return vision_tower(pixel_values)

    class Model(HivtpModelMixin, Base):
        """The mixin's tower call, with its attributes set as _hivtp_setup would."""

        def __init__(self, tower: _Tower, data_parallel: bool) -> None:
            self.vision_tower = tower
            self.hivtp_recorder = build_recorder(
                tower.vision_model, LAYERS, params.parse_server(BAND)
            )
            self.hivtp_data_parallel = data_parallel

    out: dict[str, object] = {}
    for batch, rows in ((3, torch.tensor([0, 2])), (1, None)):
        qk = _band_inputs(batch)
        # --mm-encoder-tp-mode weights: each worker holds half of the heads.
        weights = Model(_Tower(HEADS // WORLD, rank), data_parallel=False)
        recorder = weights.hivtp_recorder
        # The same shard's partial sums, not reduced: what a worker would
        # select if the plugin forgot the other workers' heads.
        local = ReceivedAttention(
            recorder.modules, num_heads=recorder.num_heads, total_heads=HEADS, scale=recorder.scale
        )
        with recorder.recording(rows), local.recording(rows):
            features_w = weights._image_pixels_to_features(weights.vision_tower, qk)
        got = {"weights_reduces": recorder.reduce is not None, "weights": recorder.patch_scores()}
        got["local_only"] = local.patch_scores()
        # --mm-encoder-tp-mode data: all heads, each worker a slice of the batch.
        data = Model(_Tower(HEADS, None), data_parallel=True)
        with data.hivtp_recorder.recording(rows):
            features_d = data._image_pixels_to_features(data.vision_tower, qk)
        got["data_reduces"] = data.hivtp_recorder.reduce is not None
        got["data"] = data.hivtp_recorder.patch_scores()
        got["features_weights"], got["features_data"] = features_w, features_d
        got["seen_weights"] = weights.vision_tower.images_seen
        got["seen_data"] = data.vision_tower.images_seen
        out[f"b{batch}"] = got
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")


def test_workers_reduce_to_single_worker_scores_and_selection(tmp_path: Path) -> None:
    mp.start_processes(
        _worker,
        args=(str(tmp_path / "init"), str(tmp_path)),
        nprocs=WORLD,
        join=True,
        start_method="spawn",
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for batch, rows in ((3, torch.tensor([0, 2])), (1, None)):
        qk = _band_inputs(batch)
        single = _single_worker_scores(qk, rows)
        want = _select(single)
        for got in (r[f"b{batch}"] for r in ranks):
            # Sharded heads are all-reduced; a replicated tower is not.
            assert got["weights_reduces"] and not got["data_reduces"]
            for mode in ("weights", "data"):
                torch.testing.assert_close(got[mode], single, rtol=1e-6, atol=0)
                picked = _select(got[mode])
                assert all(torch.equal(a, b) for a, b in zip(picked, want, strict=True)), mode
            # Data mode: each worker encoded its half of the (padded) batch,
            # and the gathered features are the whole batch, in order.
            assert got["seen_weights"] == [batch]
            assert got["seen_data"] == [-(-batch // WORLD)]
            assert torch.equal(got["features_data"], got["features_weights"])
            assert got["features_data"].shape[0] == batch
            # Without the reduction a worker sees half the heads and picks
            # other tokens: the comparison above can fail.
            local = _select(got["local_only"])
            assert any(not torch.equal(a, b) for a, b in zip(local, want, strict=True))


# -- real servers --------------------------------------------------------

IMAGES = [image_data_url(seed) for seed in range(3)]
MODES = {
    "tp1": [],
    "tp2-weights": ["--tensor-parallel-size", "2"],
    "tp2-data": ["--tensor-parallel-size", "2", "--mm-encoder-tp-mode", "data"],
}
# What each worker logs when it builds the model (hivtp_vllm.models.common).
HEADS_LOG = {
    "tp1": "4/4 heads per worker\n",
    "tp2-weights": "2/4 heads per worker, partial scores all-reduced\n",
    "tp2-data": "4/4 heads per worker\n",
}


def cpu_binding(workers: int) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` giving each worker its own cores.

    vLLM's CPU backend binds one worker per NUMA node by default and refuses
    more workers than nodes ("Not enough allowed NUMA nodes to bind threads
    of 2 local CPUWorkers"); this machine has one node, so the cores are
    split by hand.
    """
    cpus = sorted(os.sched_getaffinity(0))
    per = len(cpus) // workers
    assert per >= 1, f"{workers} workers need {workers} cores, have {cpus}"
    return "|".join(",".join(map(str, cpus[i * per : (i + 1) * per])) for i in range(workers))


def answers(server) -> list[dict]:
    out = []
    for images in (IMAGES[:1], IMAGES[:3]):
        response = server.chat(
            images,
            {"hivtp_retain_ratio": 0.25},
            max_tokens=8,
            logprobs=True,
            prompt_logprobs=0,
            return_token_ids=True,
        )
        assert response.status_code == 200, response.text
        body = response.json()
        choice = body["choices"][0]
        out.append(
            {
                "prompt_tokens": body["usage"]["prompt_tokens"],
                "token_ids": choice["token_ids"],
                "logprobs": [t["logprob"] for t in choice["logprobs"]["content"]],
                "prompt_logprobs": [
                    next(iter(p.values()))["logprob"] for p in body["prompt_logprobs"] if p
                ],
            }
        )
    return out


@pytest.mark.server
def test_tp2_answers_like_tp1(server_factory, tiny_llava, shared_plugin_server):
    results, logs = {}, {}
    for name, args in MODES.items():
        if not args:
            server = shared_plugin_server  # one worker, vLLM's defaults
        else:
            with pytest.MonkeyPatch.context() as env:
                env.setenv("VLLM_CPU_OMP_THREADS_BIND", cpu_binding(2))
                server = server_factory(tiny_llava, *args)
        results[name] = answers(server)
        logs[name] = Path(server.log.name).read_text()
        if args:
            server.stop()

    for name, log in logs.items():
        workers = 1 if name == "tp1" else 2
        lines = re.findall(r"hivtp: scoring from vision layers .*\n", log)
        assert len(lines) == workers, (name, lines)
        assert all(line.endswith(HEADS_LOG[name]) for line in lines), (name, lines)
        assert "does not support `--mm-encoder-tp-mode data`" not in log, name

    reference = results["tp1"]
    assert reference[0]["prompt_tokens"] < reference[1]["prompt_tokens"]
    for name in ("tp2-weights", "tp2-data"):
        for want, got in zip(reference, results[name], strict=True):
            assert got["prompt_tokens"] == want["prompt_tokens"], name
            assert got["token_ids"] == want["token_ids"], name
            # Float sums in another order differ by ~1e-6; a worker that
            # selected other tokens moves these by 0.1 or more.
            for key in ("logprobs", "prompt_logprobs"):
                assert len(got[key]) == len(want[key])
                assert got[key] == pytest.approx(want[key], abs=1e-4), (name, key)

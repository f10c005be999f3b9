"""Loading the local models onto their device: weights found, pipelines built, batchers
made (used by the app, the CLI, the bench and bulk generation)."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from pipelines.base import pick_device, vae_choices
from pipelines.registry import MODEL_ID, VLM, WeightsInfo, best_weights, decoders_for, describe
from pipelines.sdxl_turbo import SDXLTurbo
from pipelines.vlm import Prompts, VisionLanguageModel
from server.config import Settings
from server.providers.local.batcher import BatchPolicy
from server.providers.local.chat import LocalChat
from server.providers.local.engine import ChatProcess, EngineProcess, EngineWorker
from server.providers.local.engine_child import EngineSpec, load_sdxl
from server.providers.local.images import LocalImages

log = logging.getLogger(__name__)


def batch_policy(settings: Settings) -> BatchPolicy:
    b = settings.batch
    return BatchPolicy(max_batch=b.max_batch, max_batch_pixels=b.max_batch_pixels,
                       max_wait_s=b.max_wait_ms / 1000, max_queue=b.max_queue)


def resolve_weights(settings: Settings) -> WeightsInfo:
    if settings.sdxl_weights is not None:
        return describe(settings.sdxl_weights)
    found = best_weights(settings.weights_dir)
    if found is None:
        raise FileNotFoundError(
            f"no SDXL weights under {settings.weights_dir.resolve()}: run "
            "`spillway weights tiny` (built-in default) or `spillway weights fetch sdxl-turbo`")
    return found


def _device(settings: Settings) -> torch.device:
    device = pick_device(settings.device)
    if device.type == "cpu":
        # The models' threads would otherwise spin on every core and starve the event
        # loop that parses requests and encodes images (measured: 124 -> 153 images/s).
        torch.set_num_threads(settings.cpu_threads or max(1, (os.cpu_count() or 2) - 1))
    return device


def sdxl_spec(settings: Settings, weights: WeightsInfo, device: str,
              threads: int = 1) -> EngineSpec:
    """What an image engine loads, from the settings: the weights and the decoders that go
    with them, dtype, kernels, compiled buckets."""
    tiny, fix = decoders_for(weights, settings.weights_dir)
    e = settings.engine
    return EngineSpec(str(weights.path), weights.variant, device, settings.xformers,
                      settings.images.min_side, settings.images.max_side, threads,
                      dtype=e.dtype, tiny_vae=None if tiny is None else str(tiny.path),
                      fp16_vae=None if fix is None else str(fix.path), compile=e.compile,
                      compile_mode=e.compile_mode, compile_backend=e.compile_backend,
                      warm_buckets=tuple(e.warm_buckets))


def _load_here(settings: Settings) -> tuple[SDXLTurbo, WeightsInfo, str]:
    """The image pipeline in this process: it, its weights, its one-line description."""
    weights = resolve_weights(settings)
    device = str(_device(settings))
    engine, description = load_sdxl(sdxl_spec(settings, weights, device), device)
    log.info("image model: %s", description)
    return engine, weights, description


def load_engine(settings: Settings) -> tuple[SDXLTurbo, WeightsInfo]:
    engine, weights, _ = _load_here(settings)
    return engine, weights


def load_local_images(settings: Settings) -> LocalImages:
    """The image model where ``engine.devices`` says: worker processes, or this process."""
    cudas = torch.cuda.device_count()
    devices = settings.engine.worker_devices(cudas, vlm=settings.vlm.enabled)
    if devices:
        vlm_cpus = sum(1 for d in settings.engine.vlm_worker_devices(cudas) if d == "cpu") \
            if settings.vlm.enabled else 0
        return start_workers(settings, devices, other_cpu_workers=vlm_cpus)
    engine, weights, description = _load_here(settings)
    return LocalImages(MODEL_ID, weights, engine.generate, batch_policy(settings),
                       settings.batch.default_timeout_s, description, vaes=engine.vae_choices,
                       fast_qualities=settings.images.fast_qualities)


def vlm_weights(settings: Settings) -> WeightsInfo:
    weights = best_weights(settings.weights_dir, VLM)
    if weights is None:
        raise FileNotFoundError(
            f"no vision-language weights under {settings.weights_dir.resolve()}: run "
            "`spillway weights tiny` (built-in default) or `spillway weights fetch qwen3-vl-4b`")
    return weights


def load_vlm(settings: Settings) -> tuple[VisionLanguageModel, WeightsInfo]:
    weights = vlm_weights(settings)
    return VisionLanguageModel.load(weights.path, _device(settings)), weights


def vlm_policy(settings: Settings) -> BatchPolicy:
    v = settings.vlm
    return BatchPolicy(max_batch=v.max_batch, max_batch_pixels=2**62,
                       max_wait_s=v.max_wait_ms / 1000, max_queue=v.max_queue)


def load_local_chat(settings: Settings) -> LocalChat:
    """The VLM where ``engine.vlm_devices`` says: worker processes, or this process."""
    cudas = torch.cuda.device_count()
    devices = settings.engine.vlm_worker_devices(cudas)
    if devices:
        images = settings.engine.worker_devices(cudas)
        return start_chat_workers(settings, devices,
                                  other_cpu_workers=sum(1 for d in images if d == "cpu"))
    model, weights = load_vlm(settings)
    description = f"{model.device.type}, {str(model.model.dtype).removeprefix('torch.')}"
    return LocalChat(VLM.model_id, weights, model.generate, model.prompts, vlm_policy(settings),
                     settings.vlm.timeout_s, description)


def start_chat_workers(settings: Settings, devices: list[str], *,
                       other_cpu_workers: int = 0) -> LocalChat:
    """One VLM worker process per device. The server keeps only the processor (chat
    template, tokenizer, image processor: no weights, no torch model) to prepare items and
    count their prompt tokens at admission."""
    weights = vlm_weights(settings)
    prompts = Prompts.load(weights.path)
    threads = worker_threads(settings, sum(1 for d in devices if d == "cpu") + other_cpu_workers)
    workers = [ChatProcess(EngineSpec(str(weights.path), None, device,
                                      torch_threads=threads, kind="vlm"),
                           f"vlm-{device}-{i}", **_timeouts(settings))
               for i, device in enumerate(devices)]
    description = _start_all(workers)
    return LocalChat(VLM.model_id, weights, None, prompts, vlm_policy(settings),
                     settings.vlm.timeout_s, description, workers=workers)


def _timeouts(settings: Settings, load_s: float | None = None) -> dict[str, float]:
    e = settings.engine
    return {"load_timeout_s": e.load_timeout_s if load_s is None else load_s,
            "batch_timeout_s": e.batch_timeout_s, "retry_base_s": e.restart_backoff_s}


def worker_threads(settings: Settings, workers: int) -> int:
    """torch threads per CPU worker: the cores but one, shared out among the CPU workers.

    Measured on a 2-core machine with one worker (``spillway bench --workers 1``): 2
    threads gave 23.1-25.3 images/s at 256x256 against 20.7-22.0 with 1, and 1 thread
    126-175 at 64x64 against 123-164 with 2. But with anything else busy on the box (the
    spill bench's fake clouds), 2 threads on 2 cores made batch times swing by 2x and the
    late share rose from 3.3% to 7-57%: torch's threads spin when they are
    oversubscribed. A core stays free for the HTTP side and whatever else runs."""
    if settings.cpu_threads is not None:
        return settings.cpu_threads
    return max(1, ((os.cpu_count() or 2) - 1) // max(1, workers))


def start_workers(settings: Settings, devices: list[str], *,
                  other_cpu_workers: int = 0) -> LocalImages:
    """One engine worker process per device, loaded side by side. One that cannot load is
    reported in one sentence and left out (tried again later, with backoff); the others
    serve. None loaded: an error. ``other_cpu_workers``: the VLM's, sharing the cores."""
    weights = resolve_weights(settings)
    threads = worker_threads(settings, sum(1 for d in devices if d == "cpu") + other_cpu_workers)
    specs = [sdxl_spec(settings, weights, device, threads) for device in devices]
    load_s = settings.engine.load_deadline_s(decoders=2 if specs[0].tiny_vae else 1)
    workers = [EngineProcess(spec, f"sdxl-{spec.device}-{i}", **_timeouts(settings, load_s))
               for i, spec in enumerate(specs)]
    description = _start_all(workers)
    return LocalImages(MODEL_ID, weights, None, batch_policy(settings),
                       settings.batch.default_timeout_s, description, workers=workers,
                       vaes=vae_choices(specs[0].tiny_vae is not None),
                       fast_qualities=settings.images.fast_qualities)


def _start_all(workers: list[EngineProcess] | list[ChatProcess]) -> str:
    """Start side by side; say in one sentence why one could not load; None loaded: raise."""
    with ThreadPoolExecutor(len(workers)) as pool:
        outcomes = list(pool.map(_try_start, workers))
    failed = [why for why in outcomes if why is not None]
    if len(failed) == len(workers):
        raise RuntimeError(f"no engine worker loaded: {failed[0]}")
    for why, w in zip(outcomes, workers, strict=True):
        if why is not None:
            log.error("%s (tried again in %g s)", why, w.retry_in_s)
    loaded = [w for w in workers if w.ready]
    return f"{len(loaded)} of {len(workers)} workers: " + "; ".join(
        w.description for w in loaded)


def _try_start(worker: EngineWorker) -> str | None:
    try:
        worker.start()
    except Exception as exc:  # noqa: BLE001 - said in one sentence, the others serve
        return str(exc)
    return None

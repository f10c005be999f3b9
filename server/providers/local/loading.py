"""Loading the local models onto their device: weights found, pipelines built, batchers
made (used by the app, the CLI, the bench and bulk generation)."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from pipelines.base import pick_device
from pipelines.registry import MODEL_ID, VLM, WeightsInfo, best_weights, describe
from pipelines.sdxl_turbo import Limits, SDXLTurbo
from pipelines.vlm import VisionLanguageModel
from server.config import Settings
from server.providers.local.batcher import BatchPolicy
from server.providers.local.chat import LocalChat
from server.providers.local.engine import EngineProcess
from server.providers.local.engine_child import EngineSpec
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


def load_engine(settings: Settings) -> tuple[SDXLTurbo, WeightsInfo]:
    weights = resolve_weights(settings)
    limits = Limits(min_side=settings.images.min_side, max_side=settings.images.max_side)
    device = _device(settings)
    engine = SDXLTurbo.load(weights.path, device, variant=weights.variant,
                            xformers=settings.xformers, limits=limits)
    return engine, weights


def load_local_images(settings: Settings) -> LocalImages:
    """The image model where ``engine.devices`` says: worker processes, or this process."""
    devices = settings.engine.worker_devices(torch.cuda.device_count())
    if devices:
        return start_workers(settings, devices)
    engine, weights = load_engine(settings)
    description = f"{engine.device.type}, {str(engine.pipe.dtype).removeprefix('torch.')}, " \
                  f"{engine.attention}"
    return LocalImages(MODEL_ID, weights, engine.run, batch_policy(settings),
                       settings.batch.default_timeout_s, description)


def load_vlm(settings: Settings) -> tuple[VisionLanguageModel, WeightsInfo]:
    weights = best_weights(settings.weights_dir, VLM)
    if weights is None:
        raise FileNotFoundError(
            f"no vision-language weights under {settings.weights_dir.resolve()}: run "
            "`spillway weights tiny` (built-in default) or `spillway weights fetch qwen3-vl-4b`")
    return VisionLanguageModel.load(weights.path, _device(settings)), weights


def load_local_chat(settings: Settings) -> LocalChat:
    model, weights = load_vlm(settings)
    v = settings.vlm
    policy = BatchPolicy(max_batch=v.max_batch, max_batch_pixels=2**62,
                         max_wait_s=v.max_wait_ms / 1000, max_queue=v.max_queue)
    description = f"{model.device.type}, {str(model.model.dtype).removeprefix('torch.')}"
    return LocalChat(VLM.model_id, weights, model.generate,
                     lambda item: model.count_prompt_tokens(item.messages, item.images),
                     model.context_length, policy, v.timeout_s, description)


def worker_threads(settings: Settings, workers: int) -> int:
    """torch threads per CPU worker: the cores but one (the HTTP side's) shared out."""
    if settings.cpu_threads is not None:
        return settings.cpu_threads
    return max(1, ((os.cpu_count() or 2) - 1) // max(1, workers))


def start_workers(settings: Settings, devices: list[str]) -> LocalImages:
    """One engine worker process per device, loaded side by side. One that cannot load is
    reported in one sentence and left out; the others serve. None loaded: an error."""
    weights = resolve_weights(settings)
    cpus = sum(1 for d in devices if d == "cpu")
    workers = [EngineProcess(EngineSpec(str(weights.path), weights.variant, device,
                                        settings.xformers, settings.images.min_side,
                                        settings.images.max_side,
                                        worker_threads(settings, cpus)),
                             f"sdxl-{device}-{i}", load_timeout_s=settings.engine.load_timeout_s,
                             batch_timeout_s=settings.engine.batch_timeout_s)
               for i, device in enumerate(devices)]
    with ThreadPoolExecutor(len(workers)) as pool:
        outcomes = list(pool.map(_try_start, workers))
    failed = [why for why in outcomes if why is not None]
    for why in failed:
        log.error("%s", why)
    if len(failed) == len(workers):
        raise RuntimeError(f"no engine worker loaded: {failed[0]}")
    loaded = [w for w in workers if w.ready]
    description = f"{len(loaded)} of {len(workers)} workers: " + "; ".join(
        w.description for w in loaded)
    return LocalImages(MODEL_ID, weights, None, batch_policy(settings),
                       settings.batch.default_timeout_s, description, workers=workers)


def _try_start(worker: EngineProcess) -> str | None:
    try:
        worker.start()
    except Exception as exc:  # noqa: BLE001 - said in one sentence, the others serve
        return str(exc)
    return None

"""Which weights exist on disk, and how to make or fetch them.

Each model has up to three folders under the weights folder (a diffusers or transformers
folder each, with a ``spillway.json`` marker saying where it came from), served in this
order of preference:

    image model              vision-language model
    sdxl-turbo/              vlm/             real weights from the Hugging Face Hub
    sdxl-turbo-random/       vlm-random/      real architecture, random weights (benchmarks)
    sdxl-turbo-tiny/         vlm-tiny/        tiny built-in default: same classes, random

The public model id stays the same whichever folder serves it, so client code keeps its
``model=`` when real weights arrive.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from pipelines.sdxl_random import Size

MARKER = "spillway.json"
Source = Literal["hub", "random-full", "tiny"]
PREFERENCE: tuple[Source, ...] = ("hub", "random-full", "tiny")


@dataclass(frozen=True)
class ModelSpec:
    model_id: str  # the public id clients send
    hub_repo: str
    folders: dict[Source, str]
    hub_patterns: tuple[str, ...]  # only what loading needs: no pickles, no duplicates
    hub_variant: str | None
    fetch_names: tuple[str, ...]  # what `spillway weights fetch NAME` accepts
    extras: tuple[str, ...] = ()  # model ids fetched along with this one


SDXL = ModelSpec(
    model_id="sdxl-turbo",
    hub_repo="stabilityai/sdxl-turbo",
    folders={"hub": "sdxl-turbo", "random-full": "sdxl-turbo-random", "tiny": "sdxl-turbo-tiny"},
    hub_patterns=("model_index.json", "*/config.json", "*/*.txt", "*/*.json",
                  "*/*.fp16.safetensors"),
    hub_variant="fp16",
    fetch_names=("sdxl-turbo",),
    extras=("sdxl-vae-fp16-fix",),
)
# TAESDXL, the tiny SDXL decoder (MIT): an opt-in per request (`vae: "tiny"`), several
# times faster than the full VAE and a little softer.
TAESDXL = ModelSpec(
    model_id="taesdxl",
    hub_repo="madebyollin/taesdxl",
    folders={"hub": "taesdxl", "random-full": "taesdxl-random", "tiny": "taesdxl-tiny"},
    hub_patterns=("config.json", "diffusion_pytorch_model.safetensors"),
    hub_variant=None,
    fetch_names=("taesdxl",),
)
# The SDXL VAE fine-tuned to stay finite in fp16 (MIT): what SPILLWAY_ENGINE__DTYPE=fp16
# decodes with instead of an fp32 upcast per call. bf16 (the default on CUDA) needs neither.
SDXL_VAE_FP16 = ModelSpec(
    model_id="sdxl-vae-fp16-fix",
    hub_repo="madebyollin/sdxl-vae-fp16-fix",
    folders={"hub": "sdxl-vae-fp16-fix"},
    hub_patterns=("config.json", "diffusion_pytorch_model.safetensors"),
    hub_variant=None,
    fetch_names=("sdxl-vae-fp16-fix",),
)
# Qwen3-VL-4B-Instruct: Apache-2.0, strong at OCR, charts, documents and Chinese text, and
# small enough (4B, ~9 GB in bf16) to share one GPU with SDXL-Turbo. README says more.
VLM = ModelSpec(
    model_id="local-vlm",
    hub_repo="Qwen/Qwen3-VL-4B-Instruct",
    folders={"hub": "vlm", "random-full": "vlm-random", "tiny": "vlm-tiny"},
    hub_patterns=("*.json", "*.safetensors", "*.txt", "*.jinja", "*.model"),
    hub_variant=None,
    fetch_names=("qwen3-vl-4b", "qwen3-vl-4b-instruct", "local-vlm", "vlm"),
)
SPECS = (SDXL, VLM, TAESDXL, SDXL_VAE_FP16)
MODEL_ID = SDXL.model_id
HUB_REPO = SDXL.hub_repo
FOLDERS = SDXL.folders


class FetchError(RuntimeError):
    """A download that could not happen, said in one sentence."""


@dataclass(frozen=True)
class WeightsInfo:
    model_id: str
    source: Source
    path: Path
    variant: str | None = None
    hub_repo: str = HUB_REPO

    @property
    def label(self) -> str:
        return self.hub_repo if self.source == "hub" else f"{self.source} (random weights)"


def _has_model(folder: Path) -> bool:
    return (folder / "model_index.json").is_file() or (folder / "config.json").is_file()


def _read(folder: Path, source: Source, spec: ModelSpec) -> WeightsInfo | None:
    if not _has_model(folder):
        return None
    meta: dict[str, str] = {}
    if (folder / MARKER).is_file():
        meta = json.loads((folder / MARKER).read_text())
    found = meta.get("source")
    return WeightsInfo(spec.model_id, found if found in PREFERENCE else source,
                       folder, meta.get("variant"), spec.hub_repo)


def describe(folder: Path, spec: ModelSpec = SDXL) -> WeightsInfo:
    """A folder named in settings: its marker says what it is; unmarked means real weights."""
    info = _read(folder, "hub", spec)
    if info is None:
        raise FileNotFoundError(f"{folder} holds no model (no model_index.json or config.json)")
    return info


def list_weights(weights_dir: Path, spec: ModelSpec = SDXL) -> list[WeightsInfo]:
    """Every weights folder of this model present, best first."""
    found = (_read(weights_dir / spec.folders[src], src, spec)
             for src in PREFERENCE if src in spec.folders)
    return [info for info in found if info is not None]


def best_weights(weights_dir: Path, spec: ModelSpec = SDXL) -> WeightsInfo | None:
    present = list_weights(weights_dir, spec)
    return present[0] if present else None


def _mark(folder: Path, spec: ModelSpec, source: Source, variant: str | None) -> None:
    meta = {"model": spec.model_id, "source": source, "variant": variant,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (folder / MARKER).write_text(json.dumps(meta, indent=2) + "\n")


def _save(parts: list[Any], weights_dir: Path, spec: ModelSpec, source: Source,
          variant: str | None = None) -> WeightsInfo:
    """Write to a sibling temp folder, then rename: a crash never leaves half a model."""
    target = weights_dir / spec.folders[source]
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for part in parts:  # a pipeline, or a model and its processor (safetensors by default)
        part.save_pretrained(str(tmp), **({"variant": variant} if variant else {}))
    _mark(tmp, spec, source, variant)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return WeightsInfo(spec.model_id, source, target, variant, spec.hub_repo)


def build_tiny(weights_dir: Path) -> WeightsInfo:
    from pipelines.sdxl_random import build_sdxl

    return _save([build_sdxl("tiny")], weights_dir, SDXL, "tiny")


def build_tiny_vlm(weights_dir: Path) -> WeightsInfo:
    from pipelines.vlm_random import build_tiny_vlm as build

    model, processor = build()
    return _save([model, processor], weights_dir, VLM, "tiny")


def build_tiny_vae(weights_dir: Path) -> WeightsInfo:
    from pipelines.sdxl_random import build_tiny_vae as build

    return _save([build("tiny")], weights_dir, TAESDXL, "tiny")


# The class each tiny build has now. A tiny folder of another class is an older build (the
# tiny VLM was LLaVA before it became Qwen3-VL, the real default's class) and is rebuilt.
TINY_MODEL_TYPES = {VLM.model_id: "qwen3_vl"}


def _outdated_tiny(info: WeightsInfo) -> bool:
    """Only tiny builds are judged (one small JSON read); real weights never are."""
    wanted = TINY_MODEL_TYPES.get(info.model_id)
    config = info.path / "config.json"
    if info.source != "tiny" or wanted is None or not config.is_file():
        return False
    return bool(json.loads(config.read_text()).get("model_type") != wanted)


def ensure_default(weights_dir: Path) -> list[WeightsInfo]:
    """The best weights present for each model, building the tiny one where there are none
    or only an outdated tiny build (the fp16-fix VAE has no tiny build: it only matters
    with real weights)."""
    builders = {SDXL.model_id: build_tiny, VLM.model_id: build_tiny_vlm,
                TAESDXL.model_id: build_tiny_vae}
    found = []
    for spec in SPECS:
        if spec.model_id not in builders:
            continue
        info = best_weights(weights_dir, spec)
        if info is None or _outdated_tiny(info):
            info = builders[spec.model_id](weights_dir)
        found.append(info)
    return found


def decoders_for(sdxl: WeightsInfo, weights_dir: Path
                 ) -> tuple[WeightsInfo | None, WeightsInfo | None]:
    """(tiny VAE, fp16-fix VAE) to serve beside these SDXL weights. Real weights get only
    real decoders (a random one would turn real latents into noise); random weights take
    any, their pictures are noise anyway."""
    tiny = best_weights(weights_dir, TAESDXL)
    fix = best_weights(weights_dir, SDXL_VAE_FP16)
    if sdxl.source == "hub" and tiny is not None and tiny.source != "hub":
        tiny = None
    return tiny, fix


def build_random_full(weights_dir: Path, device: str = "auto",
                      size: Size = "full") -> WeightsInfo:
    """The real SDXL-Turbo architecture with random weights, saved as the fp16 variant
    (``size="tiny"`` takes the same path with the tiny configs, for tests)."""
    from pipelines.base import pick_device
    from pipelines.sdxl_random import build_sdxl
    from pipelines.sdxl_random import build_tiny_vae as build_vae

    pipe = build_sdxl(size, dtype=torch.float16, device=pick_device(device))
    _save([build_vae(size)], weights_dir, TAESDXL, "random-full")
    return _save([pipe], weights_dir, SDXL, "random-full", variant="fp16")


def spec_for(name: str) -> ModelSpec:
    for spec in SPECS:
        if name.lower() in spec.fetch_names:
            return spec
    known = ", ".join(n for spec in SPECS for n in spec.fetch_names[:1])
    raise FetchError(f"unknown model {name!r}: fetchable models are {known}")


def fetch(name: str, weights_dir: Path, endpoint: str | None = None) -> WeightsInfo:
    """Download the real weights with huggingface_hub (needs a network), and the models
    that go with them (``extras``)."""
    spec = spec_for(name)
    info = _fetch_one(spec, weights_dir, endpoint)
    for extra in spec.extras:
        _fetch_one(spec_for(extra), weights_dir, endpoint)
    return info


def _fetch_one(spec: ModelSpec, weights_dir: Path, endpoint: str | None) -> WeightsInfo:
    from huggingface_hub import snapshot_download

    target = weights_dir / spec.folders["hub"]
    tmp = target.with_name(target.name + ".partial")  # kept on failure: the next try resumes
    try:
        snapshot_download(repo_id=spec.hub_repo, local_dir=str(tmp),
                          allow_patterns=list(spec.hub_patterns), endpoint=endpoint)
    except Exception as exc:  # any failure ends in the same one-sentence answer
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise FetchError(
            f"could not download {spec.hub_repo} from the Hugging Face Hub ({reason}); "
            f"on a machine without hub access, copy the model folder into {target} "
            "instead") from exc
    _mark(tmp, spec, "hub", spec.hub_variant)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return WeightsInfo(spec.model_id, "hub", target, spec.hub_variant, spec.hub_repo)

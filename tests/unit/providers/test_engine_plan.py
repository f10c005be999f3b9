"""Where each model runs (engine.devices and engine.vlm_devices on machines with 0-4
GPUs), and what a chat row is on the pipe to a VLM worker."""

from __future__ import annotations

import os
import pickle
import threading

import pytest
from PIL import Image

from pipelines.vlm import ChatItem
from server.config import EngineSettings
from server.providers.local.work import WireChat


def plan(cuda: int, devices: str = "auto", vlm: str = "auto", serve_vlm: bool = True
         ) -> tuple[list[str], list[str]]:
    return EngineSettings(devices=devices, vlm_devices=vlm).plan(cuda, serve_vlm)


@pytest.mark.parametrize(("cuda", "images", "chat"), [
    (0, ["cpu"], ["cpu"]),  # a CPU machine: one worker each, side by side
    (1, ["cuda:0"], ["cuda:0"]),  # one GPU: the VLM beside SDXL
    (2, ["cuda:0"], ["cuda:1"]),  # two or more: its own, the last one
    (4, ["cuda:0", "cuda:1", "cuda:2"], ["cuda:3"]),
])
def test_auto(cuda: int, images: list[str], chat: list[str]) -> None:
    assert plan(cuda) == (images, chat)


def test_without_a_vlm_the_image_model_keeps_every_gpu() -> None:
    assert plan(2, serve_vlm=False) == (["cuda:0", "cuda:1"], [])


def test_inprocess_images_keep_the_vlm_in_process_unless_told() -> None:
    assert plan(2, devices="inprocess") == ([], [])
    assert plan(0, devices="inprocess", vlm="cpu") == ([], ["cpu"])


def test_named_devices() -> None:
    assert plan(2, devices="cuda:0") == (["cuda:0"], ["cuda:1"])  # a free GPU: its own
    assert plan(2, devices="cuda:0,cuda:1") == (["cuda:0", "cuda:1"], ["cuda:1"])  # beside
    assert plan(0, devices="cpu,cpu") == (["cpu", "cpu"], ["cpu"])
    assert plan(3, vlm="cuda:0") == (["cuda:1", "cuda:2"], ["cuda:0"])
    assert plan(2, vlm="cuda:0,cuda:1") == (["cuda:0", "cuda:1"], ["cuda:0", "cuda:1"])
    assert plan(2, vlm="inprocess") == (["cuda:0", "cuda:1"], [])


@pytest.mark.parametrize(("vlm", "says"), [
    ("cuda:2", "'cuda:2', but this machine has 2 CUDA devices"),
    ("gpu", "'gpu' is not cpu, cuda or cuda:N"),
    (",", "names no device"),
])
def test_a_bad_vlm_device_is_named(vlm: str, says: str) -> None:
    with pytest.raises(ValueError, match="engine.vlm_devices") as exc:
        plan(2, vlm=vlm)
    assert says in str(exc.value)


def test_a_chat_row_crosses_as_primitives_and_comes_back_whole() -> None:
    image = Image.new("RGBA", (5, 3), (10, 20, 30, 255))
    item = ChatItem([{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                  {"type": "image"}]}],
                    [image], max_tokens=7, temperature=0.5, top_p=0.9, stop=("x",), seed=4,
                    on_text=lambda _: None, cancel=threading.Event())
    wire = pickle.loads(pickle.dumps(WireChat.of(item)))
    assert wire.stream and wire.sizes == [(5, 3)]
    cancel = threading.Event()
    back = wire.item(print, cancel)
    assert (back.messages, back.max_tokens, back.temperature, back.top_p, back.stop,
            back.seed) == (item.messages, 7, 0.5, 0.9, ("x",), 4)
    assert back.images[0].tobytes() == image.convert("RGB").tobytes()
    assert back.on_text is print and back.cancel is cancel
    quiet = WireChat.of(ChatItem([{"role": "user", "content": "hi"}]))
    assert not quiet.stream and quiet.item(print, cancel).on_text is None


def test_cpu_workers_share_the_cores_but_one_unless_told() -> None:
    from server.config import Settings
    from server.providers.local.loading import worker_threads

    cores = os.cpu_count() or 2
    assert worker_threads(Settings(), 1) == max(1, cores - 1)
    assert worker_threads(Settings(), 2) == max(1, (cores - 1) // 2)
    assert worker_threads(Settings(), 4 * cores) == 1  # never none
    assert worker_threads(Settings(cpu_threads=3), 2) == 3

"""Decoded pixels to what the encoder takes, two ways, side by side (CPU or GPU):

- diffusers' path (``output_type="pil"``): fp32 to the host, numpy, PIL images;
- Spillway's (pipelines/postprocess.py): clamp, scale and round to uint8 on the device,
  with the finite check, then one copy out, then PIL images over the uint8 arrays.

    python -m scripts.postprocess_bench [--batch 16] [--size 512] [--repeats 20]

Random [-1, 1] pixels stand in for a VAE's output (the work does not depend on them).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from pipelines.postprocess import copy_out, finite_rows, to_uint8


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    images = torch.rand(args.batch, 3, args.size, args.size, device=device) * 2 - 1
    processor = VaeImageProcessor(vae_scale_factor=8)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def diffusers_path() -> list[Image.Image]:
        out: list[Image.Image] = processor.postprocess(images, output_type="pil")
        return out

    def spillway_path() -> list[Image.Image]:
        pixels = to_uint8(images)
        assert bool(finite_rows(images).all())
        return [Image.fromarray(row) for row in copy_out(pixels)]

    a, b = diffusers_path(), spillway_path()
    worst = max(int(np.abs(np.asarray(x, int) - np.asarray(y, int)).max())
                for x, y in zip(a, b, strict=True))
    print(f"{args.batch} x {args.size}x{args.size} on {device}; largest difference "
          f"{worst} level(s) of 255")
    for name, fn in (("diffusers output_type=pil", diffusers_path),
                     ("uint8 on the device + one copy", spillway_path)):
        times = []
        for _ in range(args.repeats):
            sync()
            started = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - started)
        ms = statistics.median(times) * 1000
        print(f"{name:32} {ms:8.2f} ms per batch  {ms / args.batch:6.2f} ms per image")


if __name__ == "__main__":
    main()

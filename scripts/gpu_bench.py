"""SDXL-Turbo on one GPU, part by part: images/s through the server's own path
(``SDXLTurbo.generate``), and where each call's time goes (text encoders, UNet, VAE decode,
postprocess), per dtype, compiled or eager, full or tiny VAE, per batch size.

    python -m scripts.gpu_bench [--configs fp16-upcast,bf16,bf16-tiny,bf16-compile,...]
        [--batches 1,8,16,32] [--compile-batches 1,16] [--compile-mode MODE]
        [--size 512x512] [--steps 1] [--repeats 5] [--budget-s 420] [--json PATH]
        [--model full|tiny] [--device auto|cuda|cpu]

The model is the real SDXL-Turbo architecture with random weights, built in memory on the
device (no files, no download): speed does not depend on the weights' values. The pictures
are noise. It imports only ``pipelines.*`` (no server, no settings), so a bare GPU box needs
only diffusers and its few pure-Python needs as wheels: ``scripts/gpu_wheels.sh``.

A configuration is ``DTYPE[-compile][-tiny]``:
- ``fp16-upcast``: fp16 weights with the stock SDXL VAE decoding in fp32 on every call
  (diffusers' own rule, and what this server did before bf16);
- ``fp16``: fp16 with the VAE left in fp16. The real SDXL VAE overflows there (NaN, black
  pictures), so it is not run by default; random weights may or may not overflow;
- ``bf16``: fp32's range, so the VAE decodes in bf16 as it is; ``fp32`` (CPU, tests).
- ``-compile``: ``SDXLTurbo.compile`` (UNet and decoders, one static graph per bucket), run at
  ``--compile-batches`` only (compiling takes a minute or more per shape on the GPU);
- ``-tiny``: the tiny VAE (TAESDXL architecture) decodes instead of the full one.

Each row: warm-up calls, then ``--repeats`` timed ``generate`` calls (images/s from their
median), then as many instrumented calls that run the same steps one by one between CUDA
events (the parts' medians), and the peak device memory of the row. Rows print as they
finish; a Markdown table comes last, and the JSON (``--json``, and ``$OUT/gpu_bench.json``
when OUT is set) is rewritten after every row, so a run cut short still leaves its rows.
Configurations are not started once ``--budget-s`` has passed. Figures, not assertions.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.base import ImageItem, NotFinite, pick_device
from pipelines.buckets import Bucket, parse_buckets
from pipelines.postprocess import copy_out, finite_rows, to_uint8, unscale
from pipelines.sdxl_random import build_sdxl, build_tiny_vae
from pipelines.sdxl_turbo import Limits, SDXLTurbo

DEFAULT_CONFIGS = "fp16-upcast,bf16,bf16-tiny,bf16-compile,bf16-compile-tiny"
DTYPE_NAMES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
PARTS = ("text", "unet", "vae", "post")
PROMPTS = ("a red bicycle", "a lighthouse at dusk", "a bowl of lemons", "a snowy street",
           "a paper boat", "a green door", "a cat on a roof", "an old typewriter")
GIB = 2**30


# -- what to run ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    name: str
    dtype: torch.dtype
    upcast: bool  # the full VAE decodes in fp32 every call
    compile: bool
    vae: str  # "full" | "tiny"

    @property
    def engine_key(self) -> tuple[torch.dtype, bool]:
        """Configurations with equal keys share one engine (one build of the weights)."""
        return self.dtype, self.upcast


def parse_config(name: str) -> Config:
    """``fp16-upcast``, ``bf16-compile-tiny``...; a ValueError names what is wrong."""
    tokens = name.strip().lower().split("-")
    dtype_name, rest = tokens[0], tokens[1:]
    if dtype_name not in DTYPE_NAMES:
        raise ValueError(f"config {name!r}: {dtype_name!r} is not one of "
                         f"{', '.join(DTYPE_NAMES)}")
    upcast = bool(rest) and rest[0] == "upcast"
    if upcast:
        rest = rest[1:]
        if dtype_name != "fp16":
            raise ValueError(f"config {name!r}: only fp16 is upcast (bf16 has fp32's range)")
    unknown = set(rest) - {"compile", "tiny"}
    if unknown or len(rest) != len(set(rest)):
        raise ValueError(f"config {name!r}: after the dtype only 'compile' and 'tiny' may "
                         "follow, once each")
    return Config(name.strip().lower(), DTYPE_NAMES[dtype_name], upcast, "compile" in rest,
                  "tiny" if "tiny" in rest else "full")


def parse_ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of positive integers")
    return values


def parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    try:
        return int(width), int(height)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not WIDTHxHEIGHT") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--configs", default=DEFAULT_CONFIGS,
                    help="comma list of DTYPE[-compile][-tiny], DTYPE one of fp16-upcast, "
                         "fp16, bf16, fp32")
    ap.add_argument("--batches", type=parse_ints, default=parse_ints("1,8,16,32"))
    ap.add_argument("--compile-batches", type=parse_ints, default=parse_ints("1,16"),
                    help="batch sizes compiled and measured for the -compile configs")
    ap.add_argument("--compile-mode", default=None,
                    choices=["reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"],
                    help="torch.compile mode (default: inductor's default)")
    ap.add_argument("--size", type=parse_size, default=(512, 512))
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per row (median)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls first per row")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="no configuration starts after this many seconds")
    ap.add_argument("--model", choices=["full", "tiny"], default="full")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-tune", action="store_true",
                    help="skip SDXLTurbo.tune() (channels-last, fused QKV, TF32) on CUDA")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    try:
        args.configs = [parse_config(c) for c in args.configs.split(",") if c.strip()]
    except ValueError as exc:
        ap.error(str(exc))
    return args


# -- building ------------------------------------------------------------------------------

def build_engine(args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
                 upcast: bool, tiny: bool) -> SDXLTurbo:
    """The engine as ``SDXLTurbo.load`` leaves it, from random weights built on the device
    (random init of 3.5B parameters takes minutes on the host, seconds on a GPU)."""
    width, height = args.size
    # 1. The pipeline, in the dtype asked for, and the tiny VAE only when a config uses it.
    pipe = build_sdxl(args.model, dtype=dtype, device=device)
    pipe.set_progress_bar_config(disable=True)
    # As load() does: the VAE's own upcast flag only where the engine upcasts its decodes.
    pipe.vae.register_to_config(force_upcast=upcast)
    tiny_vae = build_tiny_vae(args.model).to(device=device, dtype=dtype) if tiny else None
    limits = Limits(min_side=min(256, width, height), max_side=max(1024, width, height))
    engine = SDXLTurbo(pipe, device, limits, tiny_vae=tiny_vae, upcast=upcast)
    # 2. The same kernels as the server gets on CUDA (load() tunes there by default).
    if device.type == "cuda" and not args.no_tune:
        engine.tune()
    return engine


def loaded_dtypes(engine: SDXLTurbo) -> dict[str, str]:
    """What each component really holds: the figures mean nothing if a cast went wrong."""
    parts: dict[str, Any] = {"unet": engine.pipe.unet, "text_encoder": engine.pipe.text_encoder,
                             "text_encoder_2": engine.pipe.text_encoder_2}
    parts.update({f"vae_{name}": vae for name, vae in engine.vaes.items()})
    return {name: ",".join(sorted({str(p.dtype).removeprefix("torch.")
                                   for p in module.parameters()}))
            for name, module in parts.items()}


# -- timing --------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PartTimer:
    """Consecutive parts of one call, timed on the device's own timeline (CUDA events: the
    host does not wait between parts, as in the real call), or by the host clock on the CPU,
    where work is synchronous anyway."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.marks: list[tuple[str, Any]] = []

    def mark(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            event.record()
            self.marks.append((name, event))
        else:
            self.marks.append((name, time.perf_counter()))

    def parts_ms(self) -> dict[str, float]:
        """Milliseconds between consecutive marks, each named by the mark that ends it."""
        sync(self.device)
        out = {}
        for (_, start), (name, end) in zip(self.marks, self.marks[1:], strict=False):
            out[name] = start.elapsed_time(end) if self.cuda else (end - start) * 1000
        return out


class RedoCounter(logging.Handler):
    """Counts the engine's own warning that a batch decoded to NaN/inf and was decoded again
    in fp32: that rescue costs time inside ``generate`` and is otherwise invisible."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "decoded to NaN/inf" in str(record.msg):
            self.count += 1


@contextmanager
def counting_redos() -> Iterator[RedoCounter]:
    counter = RedoCounter()
    logger = logging.getLogger("pipelines.sdxl_turbo")
    logger.addHandler(counter)
    try:
        yield counter
    finally:
        logger.removeHandler(counter)


def make_items(batch: int, width: int, height: int, steps: int, vae: str) -> list[ImageItem]:
    return [ImageItem(PROMPTS[i % len(PROMPTS)], 1000 + i, width, height, steps,
                      vae=vae)  # type: ignore[arg-type]
            for i in range(batch)]


def _decode_only(engine: SDXLTurbo, latents: torch.Tensor, vae_name: str,
                 compiled: bool) -> torch.Tensor:
    """The decode step of ``SDXLTurbo._decode`` alone, same three branches (fp32 upcast,
    compiled graph, eager), so the VAE's time can be told apart from the postprocess."""
    vae = engine.vaes[vae_name]
    if engine.upcast and vae_name == "full":
        return engine._decode_fp32(vae, latents)
    if compiled and engine.compiled is not None:
        out: torch.Tensor = engine.compiled.decoders[vae_name](
            unscale(latents, vae).to(vae.dtype).contiguous())
        return out
    eager: torch.Tensor = vae.decode(unscale(latents, vae).to(vae.dtype), return_dict=False)[0]
    return eager


@torch.inference_mode()
def instrumented_call(engine: SDXLTurbo, items: list[ImageItem]) -> dict[str, float]:
    """One call of ``SDXLTurbo._one_call``'s steps done one by one, a mark after each."""
    first, pipe, device = items[0], engine.pipe, engine.device
    compiled = engine.compiled is not None and engine.compiled.has(
        first.width, first.height, len(items), first.vae)
    generators = [torch.Generator(device).manual_seed(item.seed) for item in items]
    timer = PartTimer(device)
    timer.mark("start")
    # 1. Text encoders (tokenizing included, as inside the pipeline call).
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=[item.prompt for item in items], device=device, num_images_per_prompt=1,
        do_classifier_free_guidance=False)
    timer.mark("text")
    # 2. Denoising from those embeddings: noise, UNet, scheduler, the pipeline's overhead.
    with engine._unet(pipe, compiled):
        latents = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, width=first.width,
                       height=first.height, num_inference_steps=first.steps,
                       guidance_scale=first.guidance, generator=generators,
                       output_type="latent").images
    timer.mark("unet")
    # 3. VAE decode.
    images = _decode_only(engine, latents, first.vae, compiled)
    timer.mark("vae")
    # 4. Postprocess as the server does it: uint8 and the finite check on the device, the
    #    one sync (nonzero), one copy out.
    pixels = to_uint8(images)
    (~finite_rows(images)).nonzero()
    copy_out(pixels)
    timer.mark("post")
    return timer.parts_ms()


# -- one row -------------------------------------------------------------------------------

@dataclass
class Row:
    config: str
    batch: int
    images_per_s: float
    call_ms: float  # median generate() call
    parts_ms: dict[str, float]  # median of each part over the instrumented calls
    peak_gib: float | None  # CUDA only
    not_finite: int  # NotFinite items over the timed calls
    fp32_redos: int  # batches the engine decoded again in fp32 (NaN/inf in half precision)
    calls: int


def measure_row(engine: SDXLTurbo, cfg: Config, batch: int,
                args: argparse.Namespace) -> Row:
    device = engine.device
    width, height = args.size
    items = make_items(batch, width, height, args.steps, cfg.vae)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with counting_redos() as redos:
        # 1. Warm-up: cuDNN's autotuning, the allocator's growth, lazy inits stay out.
        for _ in range(args.warmup):
            engine.generate(items)
        # 2. The server's path, timed whole: images/s.
        call_s, not_finite = [], 0
        for _ in range(args.repeats):
            sync(device)
            started = time.perf_counter()
            out = engine.generate(items)
            sync(device)
            call_s.append(time.perf_counter() - started)
            not_finite += sum(isinstance(p, NotFinite) for p in out)
            assert all(isinstance(p, NotFinite) or (isinstance(p, np.ndarray) and
                       p.shape == (height, width, 3)) for p in out)
        # 3. The same steps one by one: where the time goes (one untimed call first, for
        #    what this path does once, e.g. a new tokenizer call's caches).
        instrumented_call(engine, items)
        breakdowns = [instrumented_call(engine, items) for _ in range(args.repeats)]
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    median_s = statistics.median(call_s)
    return Row(cfg.name, batch, batch / median_s, median_s * 1000,
               {part: statistics.median(b[part] for b in breakdowns) for part in PARTS},
               peak, not_finite, redos.count, args.repeats)


# -- output --------------------------------------------------------------------------------

@dataclass
class Results:
    meta: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    builds: list[dict[str, Any]] = field(default_factory=list)
    compiles: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"meta": self.meta, "rows": [asdict(r) for r in self.rows],
                "builds": self.builds, "compiles": self.compiles, "skipped": self.skipped,
                "notes": self.notes}


def json_targets(args: argparse.Namespace) -> list[Path]:
    """--json, and $OUT/gpu_bench.json where OUT is set (the device runner brings back what
    lies under $OUT)."""
    targets = [args.json] if args.json is not None else []
    if os.environ.get("OUT"):
        targets.append(Path(os.environ["OUT"]) / "gpu_bench.json")
    return targets


def write_json(results: Results, targets: list[Path]) -> None:
    text = json.dumps(results.as_dict(), indent=2)
    for path in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def row_line(row: Row) -> str:
    parts = " ".join(f"{p} {row.parts_ms[p]:.1f}" for p in PARTS)
    peak = f"{row.peak_gib:.2f} GiB" if row.peak_gib is not None else "-"
    return (f"{row.config:<20} batch {row.batch:>3}: {row.images_per_s:8.2f} images/s, "
            f"call {row.call_ms:.1f} ms (ms {parts}), peak {peak}, "
            f"not finite {row.not_finite}, fp32 redos {row.fp32_redos}")


def markdown_table(rows: list[Row]) -> str:
    head = ("| config | batch | images/s | call ms | text ms | unet ms | vae ms | post ms "
            "| peak GiB | not finite |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        peak = f"{r.peak_gib:.2f}" if r.peak_gib is not None else "-"
        lines.append(f"| {r.config} | {r.batch} | {r.images_per_s:.2f} | {r.call_ms:.1f} | "
                     + " | ".join(f"{r.parts_ms[p]:.1f}" for p in PARTS)
                     + f" | {peak} | {r.not_finite} |")
    return "\n".join(lines)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (f"{props.name} (sm_{props.major}{props.minor}, "
                f"{props.total_memory / GIB:.0f} GiB, {props.multi_processor_count} SMs)")
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} torch threads)"


# -- the run -------------------------------------------------------------------------------

def ordered_groups(configs: list[Config]) -> list[list[Config]]:
    """One group per engine, in the order first named; eager configurations before compiled
    ones, since compiling changes which graphs the engine's calls take."""
    groups: dict[tuple[torch.dtype, bool], list[Config]] = {}
    for cfg in configs:
        groups.setdefault(cfg.engine_key, []).append(cfg)
    return [sorted(g, key=lambda c: c.compile) for g in groups.values()]


def compile_engine(engine: SDXLTurbo, group: list[Config], args: argparse.Namespace,
                   results: Results) -> None:
    """``SDXLTurbo.compile`` at the compile batch sizes, only for the VAEs the compiled
    configurations use (compile() warms every loaded VAE: a tiny VAE loaded for an eager
    row would double the decoder compiles for nothing)."""
    wanted = {c.vae for c in group if c.compile}
    engine.vaes = {name: vae for name, vae in engine.vaes.items() if name in wanted}
    width, height = args.size
    buckets: list[Bucket] = parse_buckets([f"{width}x{height}@{b}"
                                           for b in args.compile_batches])
    mode = args.compile_mode or "default"
    print(f"compiling {', '.join(map(str, buckets))} x vae {', '.join(engine.vaes)} "
          f"(mode {mode}; each bucket's first VAE includes its UNet graph) ...", flush=True)
    for bucket, vae, seconds in engine.compile(buckets, mode=args.compile_mode):
        print(f"  compiled {bucket} vae {vae}: {seconds:.1f} s", flush=True)
        results.compiles.append({"dtype": str(engine.dtype).removeprefix("torch."),
                                 "bucket": str(bucket), "vae": vae, "mode": mode,
                                 "seconds": seconds})


def main(argv: list[str] | None = None) -> Results:
    args = parse_args(argv)
    started = time.perf_counter()
    device = pick_device(args.device)
    targets = json_targets(args)

    # 1. Say what runs where: the figures are only comparable on the same card and stack.
    import diffusers
    import transformers

    width, height = args.size
    meta = {"device": describe_device(device), "torch": torch.__version__,
            "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "model": args.model, "size": f"{width}x{height}", "steps": args.steps,
            "repeats": args.repeats, "warmup": args.warmup, "batches": args.batches,
            "compile_batches": args.compile_batches,
            "compile_mode": args.compile_mode or "default", "budget_s": args.budget_s,
            "configs": [c.name for c in args.configs]}
    print(f"gpu_bench: {meta['device']}; torch {meta['torch']} (CUDA {meta['cuda']}), "
          f"diffusers {meta['diffusers']}, transformers {meta['transformers']}, "
          f"python {meta['python']}", flush=True)
    print(f"model {args.model} (random weights), {width}x{height}, {args.steps} step(s), "
          f"guidance 0, {args.warmup} warm-up + {args.repeats} timed calls per row",
          flush=True)
    results = Results(meta)

    # 2. One engine per dtype (built once, freed before the next), its configurations in turn.
    for group in ordered_groups(args.configs):
        elapsed = time.perf_counter() - started
        if elapsed > args.budget_s:
            names = [c.name for c in group]
            results.skipped.extend(names)
            print(f"budget: {elapsed:.0f} s > {args.budget_s:.0f} s, not starting "
                  f"{', '.join(names)}", flush=True)
            continue
        dtype, upcast = group[0].engine_key
        t0 = time.perf_counter()
        engine = build_engine(args, device, dtype, upcast, any(c.vae == "tiny" for c in group))
        sync(device)
        dtypes = loaded_dtypes(engine)
        build = {"dtype": str(dtype).removeprefix("torch."), "upcast": upcast,
                 "seconds": time.perf_counter() - t0, "loaded": dtypes,
                 "attention": engine.attention}
        if device.type == "cuda":
            build["allocated_gib"] = torch.cuda.memory_allocated(device) / GIB
        results.builds.append(build)
        print(f"built {build['dtype']}{' (VAE upcast to fp32 per decode)' if upcast else ''} "
              f"in {build['seconds']:.1f} s: "
              + ", ".join(f"{k} {v}" for k, v in dtypes.items())
              + f"; attention {engine.attention}", flush=True)

        for cfg in group:
            elapsed = time.perf_counter() - started
            if elapsed > args.budget_s:
                results.skipped.append(cfg.name)
                print(f"budget: {elapsed:.0f} s > {args.budget_s:.0f} s, not starting "
                      f"{cfg.name}", flush=True)
                continue
            # 3. Compile once per engine, at its first compiled configuration.
            if cfg.compile and engine.compiled is None:
                compile_engine(engine, group, args, results)
            batches = args.compile_batches if cfg.compile else args.batches
            for batch in batches:
                row = measure_row(engine, cfg, batch, args)
                results.rows.append(row)
                print(f"[{time.perf_counter() - started:4.0f} s] {row_line(row)}", flush=True)
                if row.not_finite:
                    results.notes.append(f"{cfg.name} batch {batch}: {row.not_finite} items "
                                         "not finite")
                write_json(results, targets)
        # The pipelines hold reference cycles: collect them so the next build has the room.
        del engine
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # 4. The table last: the device runner's reply carries the end of the output.
    total = time.perf_counter() - started
    results.meta["total_s"] = total
    write_json(results, targets)
    if results.compiles:
        print("\ncompile seconds: " + ", ".join(
            f"{c['dtype']} {c['bucket']} {c['vae']} {c['seconds']:.0f}"
            for c in results.compiles))
    for note in results.notes:
        print(f"note: {note}")
    if results.skipped:
        print(f"skipped (budget {args.budget_s:.0f} s): {', '.join(results.skipped)}")
    print(f"\n{markdown_table(results.rows)}\n\ntotal {total:.0f} s"
          + (f"; JSON: {', '.join(map(str, targets))}" if targets else ""), flush=True)
    return results


if __name__ == "__main__":
    main()

"""`spillway`: serve, generate, weights, bench."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from server.config import Settings

if TYPE_CHECKING:
    from server.store.keys import KeyStore

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Spillway: a self-hosted image server speaking the OpenAI API.")
weights_app = typer.Typer(no_args_is_help=True, help="Make, fetch and list model weights.")
app.add_typer(weights_app, name="weights")
keys_app = typer.Typer(no_args_is_help=True, help="API keys: create, list, revoke.")
app.add_typer(keys_app, name="keys")
db_app = typer.Typer(no_args_is_help=True, help="The database: its schema version, upgrades.")
app.add_typer(db_app, name="db")

ConfigFile = Annotated[Path | None, typer.Option(
    "--config", help="a YAML or TOML settings file (default: SPILLWAY_CONFIG); "
    "SPILLWAY_* variables override it")]
config_app = typer.Typer(no_args_is_help=True, help="Check the settings.")
app.add_typer(config_app, name="config")
WeightsDir = Annotated[Path | None, typer.Option(
    "--weights-dir", help="default: SPILLWAY_WEIGHTS_DIR or ./weights")]


def _settings(config: Path | None = None, **overrides: object) -> Settings:
    """Options over SPILLWAY_* over the config file (``--config`` or SPILLWAY_CONFIG)."""
    from server.config_file import ConfigError, load_settings
    from server.providers.pricing import unpriced_models

    try:
        settings = load_settings(config, **overrides)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    unpriced = unpriced_models(settings)
    if unpriced:
        raise _fail(f"{', '.join(unpriced)} has no price: add it to "
                    "prices.tokens_per_million (SPILLWAY_PRICES__TOKENS_PER_MILLION) or the "
                    "upstream's prices, or choose a model genai-prices knows")
    return settings


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


@app.command()
def serve(host: Annotated[str | None, typer.Option()] = None,
          port: Annotated[int | None, typer.Option()] = None,
          weights_dir: WeightsDir = None, config: ConfigFile = None) -> None:
    """Start the HTTP server (OpenAI-compatible, under /v1)."""
    import uvicorn

    from server import redact
    from server.app import create_app
    from server.ops import access_log

    settings = _settings(config, host=host, port=port, weights_dir=weights_dir)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # At debug the HTTP stacks and SDKs print request and response headers: not theirs.
    redact.quiet_chatty_loggers(settings.log_level)
    access_log.configure(settings.access_log)
    app_ = create_app(settings)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: object) -> None:
            # SIGTERM/SIGINT: report not-ready and refuse new work at once; uvicorn then
            # stops accepting, lets in-flight requests finish within the grace period, and
            # the lifespan leaves unfinished batch items for the next start.
            app_.state.spillway.shutting_down = True
            super().handle_exit(sig, frame)  # type: ignore[arg-type]

    from server.http.server import uvicorn_limits

    server_config = uvicorn.Config(
        app_, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
        access_log=False,  # ours has the route, cost and key name
        timeout_graceful_shutdown=int(settings.shutdown_grace_s),
        # request heads bounded in size and time (server/http/server.py)
        **uvicorn_limits(settings))
    # After uvicorn.Config, which sets up uvicorn's own handlers: every handler gets it.
    redact.install(redact.RedactingFilter(redact.Redactor(redact.settings_secrets(settings))))
    Server(server_config).run()


@app.command()
def generate(prompt: str,
             output: Annotated[Path, typer.Option("-o", "--output", help="png, jpg or webp")]
             = Path("out.png"),
             seed: Annotated[int, typer.Option()] = 0,
             size: Annotated[str, typer.Option()] = "auto",
             steps: Annotated[int | None, typer.Option(min=1, max=4)] = None,
             weights_dir: WeightsDir = None) -> None:
    """Make one image in-process, no server needed."""
    from server.errors import APIError
    from server.media.encode import encode_image
    from server.providers.local.loading import load_engine
    from server.wire.openai_images import parse_size

    settings = _settings(weights_dir=weights_dir)
    fmt = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}.get(
        output.suffix.lower())
    if fmt is None:
        raise _fail(f"cannot tell the image format from {output.name!r}: use .png, .jpg or .webp")
    try:
        width, height = parse_size(size, settings.images)
    except APIError as exc:
        raise _fail(exc.message) from exc
    try:
        engine, weights = load_engine(settings)
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise _fail(str(exc)) from exc
    from pipelines.base import ImageItem

    item = ImageItem(prompt, seed, width, height, steps or settings.images.default_steps)
    image = engine.text2img([item])[0]
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".partial")
    tmp.write_bytes(encode_image(image, fmt, None))
    tmp.replace(output)
    typer.echo(f"{output} ({width}x{height}, seed {seed}, {item.steps} step(s), "
               f"weights: {weights.label})")


@weights_app.command("tiny")
def weights_tiny(weights_dir: WeightsDir = None) -> None:
    """Build the tiny random-weight models (the built-in default): SDXL, its tiny VAE and
    the VLM."""
    from pipelines.registry import build_tiny, build_tiny_vae, build_tiny_vlm

    root = _settings(weights_dir=weights_dir).weights_dir
    for info in (build_tiny(root), build_tiny_vae(root), build_tiny_vlm(root)):
        typer.echo(f"built {info.model_id} {info.label} at {info.path}")


@weights_app.command("ensure")
def weights_ensure(weights_dir: WeightsDir = None) -> None:
    """Build a tiny model only where no weights of that model are present."""
    from pipelines.registry import MARKER, SPECS, WeightsInfo, best_weights, ensure_default

    def stamp(info: WeightsInfo | None) -> int | None:
        marker = None if info is None else info.path / MARKER
        return marker.stat().st_mtime_ns if marker is not None and marker.is_file() else None

    root = _settings(weights_dir=weights_dir).weights_dir
    before = {spec.model_id: stamp(best_weights(root, spec)) for spec in SPECS}
    for info in ensure_default(root):
        was = before[info.model_id]
        verb = ("no weights found: built" if was is None and stamp(info) is not None
                else "outdated tiny build: rebuilt" if was != stamp(info) else "using")
        typer.echo(f"{verb} {info.model_id} {info.label} at {info.path}")


@weights_app.command("fetch")
def weights_fetch(model: str, weights_dir: WeightsDir = None,
                  endpoint: Annotated[str | None, typer.Option(
                      help="hub address; default: HF_ENDPOINT or huggingface.co")] = None) -> None:
    """Download real weights from the Hugging Face Hub (needs a network).

    MODEL: sdxl-turbo (stabilityai/sdxl-turbo, with madebyollin/sdxl-vae-fp16-fix), taesdxl
    (madebyollin/taesdxl, the tiny VAE) or qwen3-vl-4b (Qwen/Qwen3-VL-4B-Instruct)."""
    from pipelines.registry import FetchError, fetch

    try:
        info = fetch(model, _settings(weights_dir=weights_dir).weights_dir, endpoint)
    except FetchError as exc:
        raise _fail(str(exc)) from exc
    typer.echo(f"fetched {info.label} into {info.path}")


@weights_app.command("random-full")
def weights_random_full(model: str, weights_dir: WeightsDir = None,
                        device: Annotated[str, typer.Option()] = "auto") -> None:
    """Build the real architecture with random weights (fp16), for GPU benchmarks."""
    from pipelines.registry import MODEL_ID, build_random_full

    if model != MODEL_ID:
        raise _fail(f"unknown model {model!r}: random-full knows {MODEL_ID!r}")
    info = build_random_full(_settings(weights_dir=weights_dir).weights_dir, device)
    typer.echo(f"built {info.label} at {info.path}")


@weights_app.command("list")
def weights_list(weights_dir: WeightsDir = None) -> None:
    """Show the weights present; * marks the folder each model is served from."""
    from pipelines.registry import SPECS, list_weights

    root = _settings(weights_dir=weights_dir).weights_dir
    found = [(i, info) for spec in SPECS for i, info in enumerate(list_weights(root, spec))]
    if not found:
        typer.echo(f"no weights under {root}: `spillway weights tiny` builds the defaults")
        return
    for i, info in found:
        mark = "*" if i == 0 else " "
        typer.echo(f"{mark} {info.model_id:12} {info.label:32} {info.path}")


@app.command()
def bench(clients: Annotated[int, typer.Option(help="concurrent clients")] = 16,
          requests: Annotated[int, typer.Option(help="requests per mode")] = 192,
          size: Annotated[str, typer.Option()] = "64x64",
          steps: Annotated[int, typer.Option(min=1, max=4)] = 1,
          weights_dir: WeightsDir = None,
          sweep: Annotated[str | None, typer.Option(
              help="instead: time the pipeline alone at these batch sizes, e.g. 1,4,8,16,32")]
          = None,
          chat: Annotated[bool, typer.Option(
              "--chat", help="bench the vision-language model (chat completions) instead")]
          = False,
          max_tokens: Annotated[int, typer.Option(help="--chat: output tokens per request")]
          = 64,
          workers: Annotated[int | None, typer.Option(
              min=1, help="instead: the pipeline in the server's process vs 1..N engine "
              "worker processes, side by side")] = None,
          burst: Annotated[int | None, typer.Option(
              min=1, help="instead: this many simultaneous requests (use --size 512x512); "
              "the server-side latency of the 429s and /healthz meanwhile")] = None) -> None:
    """Batched engine vs one-at-a-time, side by side, through the real HTTP server."""
    from server.tools import bench as bench_mod

    settings = _settings(weights_dir=weights_dir)
    if chat:
        bench_mod.compare_chat(settings, clients=clients, requests=requests,
                               max_tokens=max_tokens)
    elif burst is not None:
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            from server.tools import burst as burst_mod

            burst_mod.burst(settings, requests=burst, size=size, folder=folder)
    elif workers is not None:
        bench_mod.compare_workers(settings, clients=clients, requests=requests, size=size,
                                  steps=steps, workers=workers)
    elif sweep:
        sizes = [int(s) for s in sweep.split(",") if s.strip()]
        bench_mod.sweep(settings, sizes, size, steps)
    else:
        bench_mod.compare(settings, clients=clients, requests=requests, size=size, steps=steps)


@app.command("batch")
def batch(input_path: Annotated[Path, typer.Argument(metavar="INPUT",
                                                      help="CSV or JSONL of prompts")],
          out: Annotated[Path, typer.Option("--out", help="output folder")],
          server: Annotated[str | None, typer.Option(
              help="run against this server (its router may spill); default: in-process")]
          = None,
          api_key: Annotated[str | None, typer.Option(envvar="SPILLWAY_API_KEY")] = None,
          batch_size: Annotated[int, typer.Option(min=1)] = 8,
          concurrency: Annotated[int, typer.Option(min=1)] = 8,
          weights_dir: WeightsDir = None) -> None:
    """Offline bulk generation: rows -> images + manifest.jsonl; re-run to resume."""
    from server.tools.bulk import BulkError, run_bulk

    try:
        summary = run_bulk(input_path, out, _settings(weights_dir=weights_dir), server=server,
                           api_key=api_key, batch_size=batch_size, concurrency=concurrency,
                           echo=typer.echo)
    except BulkError as exc:
        raise _fail(str(exc)) from exc
    if summary.interrupted:
        raise typer.Exit(130)


def _keystore() -> KeyStore:
    from server.store.keys import KeyStore
    from server.store.ledger import Ledger

    return KeyStore(Ledger(_settings().ledger_url))


@keys_app.command("create")
def keys_create(name: Annotated[str, typer.Option("--name")],
                daily_images: Annotated[int | None, typer.Option(min=0)] = None,
                daily_usd: Annotated[float | None, typer.Option(min=0)] = None,
                priority: Annotated[str, typer.Option(help="interactive or bulk")]
                = "interactive") -> None:
    """Make a key; it is printed once and stored only as a hash."""
    if priority not in ("interactive", "bulk"):
        raise _fail(f"priority must be interactive or bulk, not {priority!r}")
    try:
        key = _keystore().create(name, daily_images=daily_images, daily_usd=daily_usd,
                                 priority=priority)  # type: ignore[arg-type]
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    typer.echo(key)
    typer.echo(f"key {name!r} created; it is shown only now. Requests must now send "
               "'Authorization: Bearer <key>'.", err=True)


@keys_app.command("list")
def keys_list() -> None:
    """Keys, their quotas and today's use (never the keys themselves)."""
    from server.store.keys import KeyStore
    from server.store.ledger import Ledger
    from server.store.quotas import Quotas

    settings = _settings()
    ledger = Ledger(settings.ledger_url)
    rows, quotas = KeyStore(ledger).list(), Quotas(ledger)
    if not rows:
        typer.echo("no team keys: " + ("only the admin key (SPILLWAY_ADMIN_KEY) is accepted"
                                       if settings.admin_key is not None else
                                       "the server is open to anyone who can reach it"))
        return
    typer.echo(f"{'name':<20}{'key':<16}{'priority':<13}{'images today':>14}"
               f"{'usd today':>11}  status")
    for k in rows:
        used_images, used_usd = quotas.used(k.owner)
        images = (f"{used_images}/{k.daily_images}" if k.daily_images is not None
                  else str(used_images))
        usd = f"{used_usd:.2f}/{k.daily_usd:.2f}" if k.daily_usd is not None else f"{used_usd:.2f}"
        status = "active" if k.revoked_at is None else f"revoked {k.revoked_at:%Y-%m-%d}"
        typer.echo(f"{k.name:<20}{k.shown:<16}{k.priority:<13}{images:>14}{usd:>11}  {status}")


@keys_app.command("revoke")
def keys_revoke(name: str) -> None:
    """Revoke a key by name (takes effect within seconds on a running server)."""
    if not _keystore().revoke(name):
        raise _fail(f"no active key named {name!r}")
    typer.echo(f"revoked {name!r}")


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Migrate the database (SPILLWAY_LEDGER_URL) to the newest schema. The server does
    this itself at start-up; this is for doing it ahead of time, or checking."""
    from sqlalchemy.engine import make_url

    from server.store import db

    url = _settings().ledger_url
    engine = db.open_engine(url)
    try:
        before = db.current(engine)
        db.upgrade(engine)
        after = db.current(engine)
    finally:
        engine.dispose()
    shown = make_url(url).render_as_string(hide_password=True)
    if before == after:
        typer.echo(f"{shown}: at {after} (newest), nothing to do")
    else:
        typer.echo(f"{shown}: upgraded from {before or 'no version'} to {after}")


@app.command()
def usage(group_by: Annotated[str, typer.Option(
              help="key, route, model, day or endpoint")] = "route",
          days: Annotated[float, typer.Option(help="how far back")] = 1.0) -> None:
    """Totals from the ledger: images, tokens, device-seconds, cost, savings vs all-cloud."""
    from datetime import UTC, datetime, timedelta

    from server.store.ledger import GROUPS, Ledger

    if group_by not in GROUPS:
        raise _fail(f"group-by must be one of {', '.join(GROUPS)}")
    ledger = Ledger(_settings().ledger_url)
    rows = ledger.totals(since=datetime.now(UTC) - timedelta(days=days), group_by=group_by)
    typer.echo(f"{group_by:<24}{'requests':>9}{'images':>8}{'tokens':>9}{'device s':>10}"
               f"{'cost $':>10}{'all-cloud $':>12}{'saved $':>10}")
    for r in rows:
        tokens = r["prompt_tokens"] + r["completion_tokens"]
        typer.echo(f"{str(r['group']):<24}{r['requests']:>9}{r['images']:>8}{tokens:>9}"
                   f"{r['device_seconds']:>10.1f}{r['cost_usd']:>10.4f}"
                   f"{r['cloud_equivalent_usd']:>12.4f}{r['savings_usd']:>10.4f}")


if __name__ == "__main__":  # pragma: no cover - `python -m server.cli`
    app()


@config_app.command("check")
def config_check(config: ConfigFile = None) -> None:
    """Validate the settings (file and environment) and print them as YAML, every secret
    masked: what the server would run with."""
    import yaml

    from server.config_file import effective

    settings = _settings(config)
    typer.echo(yaml.safe_dump(effective(settings), sort_keys=False, allow_unicode=True),
               nl=False)

"""Settings from a YAML or TOML file under the environment, checked by `spillway config
check`: the same effective settings however they are given, secrets never printed, and a
bad file refused in one sentence naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from server.cli import app
from server.config_file import ConfigError, load_settings, unknown_keys

YAML = """\
# a team's box
port: 8100
batch:
  max_wait_ms: 5
  max_batch: 24
openai:
  api_key: sk-file-secret-123
  vision_model: gpt-4o
router:
  daily_budget_usd: {openai: 5, gemini: 5, total: 8}
ledger_url: postgresql://spill:hunter2@db.lan/ledger
"""
TOML = """\
port = 8100
ledger_url = "postgresql://spill:hunter2@db.lan/ledger"
[batch]
max_wait_ms = 5
max_batch = 24
[openai]
api_key = "sk-file-secret-123"
vision_model = "gpt-4o"
[router.daily_budget_usd]
openai = 5
gemini = 5
total = 8
"""
ENV = {"SPILLWAY_PORT": "8100", "SPILLWAY_BATCH__MAX_WAIT_MS": "5",
       "SPILLWAY_BATCH__MAX_BATCH": "24", "SPILLWAY_OPENAI__API_KEY": "sk-file-secret-123",
       "SPILLWAY_OPENAI__VISION_MODEL": "gpt-4o",
       "SPILLWAY_ROUTER__DAILY_BUDGET_USD": '{"openai": 5, "gemini": 5, "total": 8}',
       "SPILLWAY_LEDGER_URL": "postgresql://spill:hunter2@db.lan/ledger"}


@pytest.fixture(autouse=True)
def _no_ambient_config(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [*ENV, "SPILLWAY_CONFIG"]:
        monkeypatch.delenv(name, raising=False)


def check(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["config", "check", *args], env=env)
    return result.exit_code, result.output


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_file_and_the_environment_give_the_same_effective_settings(tmp_path: Path) -> None:
    code, from_env = check(env=ENV)
    assert code == 0, from_env
    for name, text in (("s.yaml", YAML), ("s.toml", TOML)):
        code, from_file = check("--config", str(write(tmp_path, name, text)))
        assert code == 0, from_file
        assert from_file == from_env
    effective = yaml.safe_load(from_env)
    assert effective["port"] == 8100 and effective["batch"]["max_batch"] == 24
    assert effective["router"]["daily_budget_usd"] == {"openai": 5, "gemini": 5, "total": 8}


def test_secrets_are_never_printed(tmp_path: Path) -> None:
    code, out = check("--config", str(write(tmp_path, "s.yaml", YAML)))
    assert code == 0
    assert "sk-file-secret-123" not in out and "hunter2" not in out
    effective = yaml.safe_load(out)
    assert effective["openai"]["api_key"] == "**********"
    assert effective["ledger_url"] == "postgresql://spill:***@db.lan/ledger"


def test_the_environment_overrides_the_file_and_options_override_both(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "s.yaml", YAML)
    monkeypatch.setenv("SPILLWAY_BATCH__MAX_BATCH", "8")
    settings = load_settings(path, port=9000)
    assert settings.batch.max_batch == 8  # env over file
    assert settings.batch.max_wait_ms == 5  # the file's, beside the env's in one section
    assert settings.port == 9000  # the command line over both
    monkeypatch.setenv("SPILLWAY_CONFIG", str(path))
    assert load_settings().openai.vision_model == "gpt-4o"  # named by the environment


@pytest.mark.parametrize(("name", "text", "says"), [
    ("s.yaml", "batch:\n  max_batch: 0\n", "batch.max_batch: Input should be greater"),
    ("s.yaml", "batch:\n  max_bacth: 8\n", "unknown setting batch.max_bacth"),
    ("s.yaml", "prices:\n  local_gpu_per_hour: -1\n", "prices.local_gpu_per_hour"),
    ("s.yaml", "engine:\n  dtype: fp8\n", "engine.dtype"),
    ("s.yaml", "batch: [1, 2\n", "does not parse"),
    ("s.toml", "batch:\n  max_batch: 0\n", "does not parse"),
    ("s.json", "{}", "use .yaml, .yml or .toml"),
])
def test_a_bad_file_is_refused_in_one_sentence_naming_the_field(
        tmp_path: Path, name: str, text: str, says: str) -> None:
    code, out = check("--config", str(write(tmp_path, name, text)))
    assert code == 1
    assert says in out and out.count("\n") == 1 and "Traceback" not in out


def test_a_missing_file_is_named() -> None:
    with pytest.raises(ConfigError, match="config file /nonexistent.yaml does not exist"):
        load_settings(Path("/nonexistent.yaml"))


def test_mappings_take_any_keys_models_do_not() -> None:
    from server.config import Settings

    assert unknown_keys({"router": {"rate_limits": {"any-model": {"per_minute": 1}}}},
                        Settings) == []
    assert unknown_keys({"router": {"spil": True}, "prot": 1}, Settings) == [
        "router.spil", "prot"]


def test_the_example_file_in_the_repo_is_valid() -> None:
    example = Path(__file__).parents[2] / "docs" / "spillway.example.yaml"
    code, out = check("--config", str(example))
    assert code == 0, out
    assert yaml.safe_load(out)["images"]["fast_qualities"] == ["low"]


def test_a_configured_cloud_whose_chat_model_has_no_price_stops_the_start() -> None:
    code, out = check(env={"SPILLWAY_OPENAI__API_KEY": "sk-x",
                           "SPILLWAY_OPENAI__VISION_MODEL": "gpt-made-up"})
    assert code == 1 and "openai.vision_model 'gpt-made-up' has no price" in out
    assert "sk-x" not in out
    # priced by the configured table, or by genai-prices' (gpt-4.1)
    assert check(env={"SPILLWAY_OPENAI__API_KEY": "sk-x",
                      "SPILLWAY_OPENAI__VISION_MODEL": "gpt-made-up",
                      "SPILLWAY_PRICES__TOKENS_PER_MILLION": '{"gpt-made-up": [1, 2]}'})[0] == 0
    assert check(env={"SPILLWAY_OPENAI__API_KEY": "sk-x",
                      "SPILLWAY_OPENAI__VISION_MODEL": "gpt-4.1"})[0] == 0


UPSTREAMS_YAML = """\
upstreams:
  - name: relay-a
    kind: openai-compatible
    base_url: http://relay-a.lan/v1
    api_key_env: RELAY_KEY
    tier: economy
    prices: {factor: 0.5}
    rate_limits: {gpt-image-1: {per_minute: 60, burst: 10}}
  - name: claude
    kind: anthropic
    api_key: sk-ant-inline-secret-99
    tier: premium
    daily_budget_usd: 12.5
"""
UPSTREAMS_ENV = {"SPILLWAY_UPSTREAMS": (
    '[{"name": "relay-a", "kind": "openai-compatible", "base_url": "http://relay-a.lan/v1",'
    ' "api_key_env": "RELAY_KEY", "tier": "economy", "prices": {"factor": 0.5},'
    ' "rate_limits": {"gpt-image-1": {"per_minute": 60, "burst": 10}}},'
    ' {"name": "claude", "kind": "anthropic", "api_key": "sk-ant-inline-secret-99",'
    ' "tier": "premium", "daily_budget_usd": 12.5}]')}


def test_upstreams_from_a_file_or_the_environment_are_the_same(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_KEY", "sk-relay-env-secret-42")
    code, from_file = check("--config", str(write(tmp_path, "s.yaml", UPSTREAMS_YAML)))
    assert code == 0, from_file
    code, from_env = check(env=UPSTREAMS_ENV)
    assert code == 0, from_env
    assert from_file == from_env
    for secret in ("sk-relay-env-secret-42", "sk-ant-inline-secret-99"):
        assert secret not in from_file
    relay, claude = yaml.safe_load(from_file)["upstreams"]
    assert (relay["api_key"], relay["api_key_env"], relay["tier"]) == (
        "**********", "RELAY_KEY", "economy")
    assert (claude["api_key"], claude["image_model"], claude["vision_model"]) == (
        "**********", None, "claude-haiku-4-5")


BAD_UPSTREAM = {"name": "relay", "kind": "openai-compatible", "base_url": "http://r/v1",
                "api_key_env": "RELAY_KEY"}


@pytest.mark.parametrize(("change", "says"), [
    ({"kind": "bedrock"}, "upstreams.0.kind: Input should be 'openai', 'azure'"),
    ({"api_key_env": "NO_SUCH_VARIABLE"},
     "upstreams.0.api_key_env: Value error, the environment variable NO_SUCH_VARIABLE is "
     "not set"),
    ({"prices": {"tokens_per_million": {"gpt-4o-mini": [-1, 2]}}},
     "upstreams.0.prices.tokens_per_million.gpt-4o-mini.0: Input should be greater than or "
     "equal to 0"),
    ({"prices": {"factor": -0.5}}, "upstreams.0.prices.factor"),
    ({"tier": "gold"}, "upstreams.0.tier: Input should be 'economy', 'standard' or 'premium'"),
    ({"base_url": None}, "base_url: an openai-compatible upstream needs its base_url"),
    ({"bsae_url": "http://r/v1"}, "upstreams.0.bsae_url: Extra inputs are not permitted"),
    ({"vision_model": "mystery-model"},
     "upstreams.0 (relay).vision_model 'mystery-model' has no price"),
])
def test_a_bad_upstream_stops_the_start_in_one_sentence_naming_the_field(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: dict[str, object],
        says: str) -> None:
    monkeypatch.setenv("RELAY_KEY", "sk-relay-env-secret-42")
    path = write(tmp_path, "s.yaml", yaml.safe_dump({"upstreams": [{**BAD_UPSTREAM, **change}]}))
    code, out = check("--config", str(path))
    assert code == 1 and says in out, out
    assert out.count("\n") == 1 and "sk-relay-env-secret-42" not in out


def test_two_upstreams_of_one_name_or_a_list_beside_the_sections_are_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_KEY", "sk-relay-env-secret-42")
    twice = write(tmp_path, "twice.yaml", yaml.safe_dump({"upstreams": [BAD_UPSTREAM] * 2}))
    code, out = check("--config", str(twice))
    assert code == 1 and "upstreams.1.name: 'relay' is used twice" in out
    both = write(tmp_path, "both.yaml", yaml.safe_dump({"upstreams": [BAD_UPSTREAM]}))
    code, out = check("--config", str(both), env={"SPILLWAY_OPENAI__API_KEY": "sk-x1234567"})
    assert code == 1 and "upstreams: the openai section also has a key" in out
    assert "sk-x1234567" not in out


def test_the_example_files_upstream_list_is_valid(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    example = (Path(__file__).parents[2] / "docs" / "spillway.example.yaml").read_text()
    block = example[example.index("# --- upstreams"):example.index("# --- end of upstreams")]
    listed = "\n".join(line.removeprefix("# ") for line in block.splitlines()[1:])
    for name in ("RELAY_A_KEY", "AZURE_OPENAI_KEY", "OPENAI_API_KEY", "ANTHROPIC_API_KEY"):
        monkeypatch.setenv(name, f"sk-{name.lower()}-0123456789")
    code, out = check("--config", str(write(tmp_path, "u.yaml", listed)))
    assert code == 0, out
    names = [(u["name"], u["kind"], u["tier"]) for u in yaml.safe_load(out)["upstreams"]]
    assert names == [("relay-a", "openai-compatible", "economy"), ("azure", "azure", "standard"),
                     ("openai", "openai", "premium"), ("claude", "anthropic", "premium")]

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

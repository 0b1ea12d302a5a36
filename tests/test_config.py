"""Configuration: defaults < Dask YAML < --config FILE < DASK_DASKDP__ environment < flags."""

from __future__ import annotations

import pytest
import yaml

from conftest import REPO
from daskdp import config
from daskdp.errors import UserError


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "daskdp.yaml"
    path.write_text(yaml.safe_dump({"daskdp": {"sampling": {"max-tokens": 5, "temperature": 0.5}}}))
    return path


def test_defaults_come_from_the_shipped_yaml():
    settings = config.load()
    assert settings["sampling"]["max-tokens"] == 256
    assert settings["engine"]["trust-remote-code"] is False
    assert settings["cluster"]["host"] == "127.0.0.1"


def test_file_overrides_defaults(config_file):
    settings = config.load(config_file)
    assert settings["sampling"]["max-tokens"] == 5
    assert settings["sampling"]["top-p"] == 1.0  # untouched keys keep their default


def test_environment_overrides_file(config_file, monkeypatch):
    monkeypatch.setenv("DASK_DASKDP__SAMPLING__MAX_TOKENS", "6")
    settings = config.load(config_file)
    assert settings["sampling"]["max-tokens"] == 6
    assert settings["sampling"]["temperature"] == 0.5


def test_flags_override_environment(config_file, monkeypatch):
    monkeypatch.setenv("DASK_DASKDP__SAMPLING__MAX_TOKENS", "6")
    settings = config.load(config_file, {"sampling.max-tokens": 7, "sampling.temperature": None})
    assert settings["sampling"]["max-tokens"] == 7
    assert settings["sampling"]["temperature"] == 0.5  # a flag not given changes nothing


def test_conf_default_yaml_documents_the_real_defaults(monkeypatch):
    """conf/default.yaml, the user-facing reference, says what the built-in defaults are."""
    monkeypatch.setattr(config.dask.config, "paths", [])  # not conftest's `model: tiny`
    assert config.load(REPO / "conf" / "default.yaml") == config.load()


def test_engine_arguments_for_a_gpu_model():
    settings = config.load(REPO / "conf" / "models" / "llama-3.1-8b-instruct.yaml")
    model, arguments = config.engine_arguments(settings, gpu_host=True)
    assert model == "meta-llama/Llama-3.1-8B-Instruct"
    assert arguments["tensor_parallel_size"] == 1 and arguments["trust_remote_code"] is False
    assert "kv_cache_memory_bytes" not in arguments  # the CPU-only settings stay off GPU hosts


def test_existing_cluster_example_connects_and_starts_nothing():
    settings = config.load(REPO / "conf" / "cluster" / "existing.yaml")
    assert settings["cluster"]["scheduler-address"] == "tcp://10.1.0.12:8786"
    assert settings["cluster"]["type"] == "local" and settings["cluster"]["workers"] is None
    assert settings["run"]["partitioning"] == "dynamic"


def test_default_model_on_cpu_hosts_tiny_by_name_and_none_on_gpu_hosts(tmp_path, monkeypatch):
    monkeypatch.setattr(config.dask.config, "paths", [])  # conftest's layer names the tiny model
    monkeypatch.setattr(config, "DEFAULT_MODEL", tmp_path / "smollm2")
    with pytest.raises(UserError, match="run bash scripts/setup.sh, or pass --model tiny"):
        config.engine_arguments(config.load(), gpu_host=False)
    (tmp_path / "smollm2").mkdir()
    (tmp_path / "smollm2" / "config.json").write_text("{}")
    model, arguments = config.engine_arguments(config.load(), gpu_host=False)
    assert model == str(tmp_path / "smollm2")
    assert arguments["dtype"] == "bfloat16" and arguments["max_model_len"] == 2048
    assert arguments["kv_cache_memory_bytes"] == 1 << 30 and arguments["enforce_eager"] is True
    # named by its directory, it gets the same settings
    assert config.engine_arguments(config.load(overrides={"model": model}), gpu_host=False)[1] == arguments

    model, arguments = config.engine_arguments(config.load(overrides={"model": "tiny"}), gpu_host=False)
    assert model == str(config.TINY_MODEL) and arguments["dtype"] == "float32"
    assert arguments["max_model_len"] == 2048
    with pytest.raises(UserError, match="--model"):
        config.engine_arguments(config.load(), gpu_host=True)


def test_other_model_directories_get_cpu_defaults_not_the_tiny_models(tmp_path):
    model, arguments = config.engine_arguments(
        config.load(overrides={"model": str(tmp_path)}), gpu_host=False
    )
    assert model == str(tmp_path) and "dtype" not in arguments
    assert arguments["max_model_len"] == -1  # the model's own length, or what the KV cache holds
    assert arguments["kv_cache_memory_bytes"] == 1 << 30 and arguments["enforce_eager"] is True


def test_the_test_suite_names_the_tiny_model():
    """conftest sets the model for every test; none loads the default model by accident."""
    assert config.load()["model"] == "tiny"


@pytest.mark.parametrize("content, message", [(None, "does not exist"), ("a: [1,", "not valid YAML"),
                                              ("sampling: {}", "no top-level `daskdp:`")])  # fmt: skip
def test_bad_config_files_are_named(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=message):
        config.load(path)

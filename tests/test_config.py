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


def test_conf_default_yaml_documents_the_real_defaults():
    """conf/default.yaml, the user-facing reference, says what the built-in defaults are."""
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


def test_tiny_model_on_cpu_hosts_and_none_on_gpu_hosts():
    model, arguments = config.engine_arguments(config.load(), gpu_host=False)
    assert model.endswith("tiny-llama") and arguments["dtype"] == "float32"
    with pytest.raises(UserError, match="--model"):
        config.engine_arguments(config.load(), gpu_host=True)


@pytest.mark.parametrize("content, message", [(None, "does not exist"), ("a: [1,", "not valid YAML"),
                                              ("sampling: {}", "no top-level `daskdp:`")])  # fmt: skip
def test_bad_config_files_are_named(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=message):
        config.load(path)

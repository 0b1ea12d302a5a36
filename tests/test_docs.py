"""The docs cover what the code declares: every flag, configuration key and output column is in
docs/reference.md, conf/default.yaml lists every key, and the README stays short and links the
docs. Fast: no engine, no cluster."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import yaml

from daskdp import cli
from daskdp.config import DEFAULTS_FILE
from daskdp.output.schema import ALL_RESULT_COLUMNS

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "docs" / "reference.md"
README = REPO / "README.md"
README_LIMIT = 12_000


def dotted_keys(tree: dict, prefix: str = "") -> set[str]:
    """The dotted paths of the leaves of a YAML mapping (a null, a scalar or a list is a leaf)."""
    keys = set()
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            keys |= dotted_keys(value, f"{path}.")
        else:
            keys.add(path)
    return keys


class UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=UniqueKeyLoader)["daskdp"]


def config_keys(path: Path) -> set[str]:
    return dotted_keys(load(path))


def subcommands() -> dict[str, argparse.ArgumentParser]:
    main = cli.parser()
    (action,) = [a for a in main._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def flags(command: argparse.ArgumentParser) -> set[str]:
    return {
        option
        for action in command._actions
        for option in action.option_strings
        if option not in ("-h", "--help")
    }


def mentions(text: str, word: str) -> bool:
    """Whether ``word`` stands on its own in ``text`` (``--top-k`` is not found in ``--top-kx``)."""
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


def test_every_flag_of_every_subcommand_is_in_the_reference():
    text = REFERENCE.read_text()
    commands = subcommands()
    assert {"run", "report"} <= set(commands)
    missing = {
        name: sorted(flag for flag in flags(command) if not mentions(text, flag))
        for name, command in commands.items()
    }
    assert not any(missing.values()), f"flags missing from docs/reference.md: {missing}"
    for name, command in commands.items():
        assert f"daskdp {name}" in text, f"docs/reference.md has no section for `daskdp {name}`"
        for action in command._actions:
            if not action.option_strings and action.metavar:  # positional arguments
                assert mentions(text, action.metavar), f"`daskdp {name} {action.metavar}` is not documented"


def test_the_flag_check_fails_on_a_missing_flag():
    text = REFERENCE.read_text()
    assert mentions(text, "--stall-timeout")
    assert not mentions(text.replace("--stall-timeout", "--stall-limit"), "--stall-timeout")
    assert not mentions("--no-prefix-locality", "--prefix-locality")


def test_every_configuration_key_is_in_the_reference_and_in_conf_default():
    keys = config_keys(DEFAULTS_FILE)
    assert "run.stall-timeout" in keys and "cluster.jobqueue.cores" in keys
    text = REFERENCE.read_text()
    missing = sorted(key for key in keys if f"`{key}`" not in text)
    assert not missing, f"configuration keys missing from docs/reference.md: {missing}"
    listed = config_keys(REPO / "conf" / "default.yaml")
    assert not keys - listed, f"keys of daskdp/daskdp.yaml missing from conf/default.yaml: {keys - listed}"
    # conf/default.yaml may run ahead of the package by a branch (the default model's engine
    # layer), but never lists a key that the reference does not explain.
    undocumented = sorted(key for key in listed if f"`{key}`" not in text)
    assert not undocumented, f"keys of conf/default.yaml missing from docs/reference.md: {undocumented}"


def test_conf_default_has_the_built_in_defaults():
    def leaves(tree: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in tree.items():
            if isinstance(value, dict) and value:
                out.update(leaves(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    built_in, listed = leaves(load(DEFAULTS_FILE)), leaves(load(REPO / "conf" / "default.yaml"))
    assert {key: listed[key] for key in built_in} == built_in


def test_a_key_given_twice_is_refused(tmp_path):
    twice = tmp_path / "twice.yaml"
    twice.write_text("daskdp:\n  run:\n    retries: 1\n  run:\n    timeout: 5\n")
    with pytest.raises(yaml.constructor.ConstructorError, match="appears twice"):
        load(twice)


def test_every_output_column_is_in_the_reference():
    text = REFERENCE.read_text()
    missing = [name for name in ALL_RESULT_COLUMNS if f"`{name}`" not in text]
    assert not missing, f"output columns missing from docs/reference.md: {missing}"
    for name in ("_manifest.json", "_chunks/", "part-", "_summary.json", "_report.html"):
        assert name in text, f"docs/reference.md does not describe {name}"


def test_readme_is_short_and_links_the_docs():
    text = README.read_text()
    assert len(text) <= README_LIMIT, f"README.md has {len(text):,} characters, more than {README_LIMIT:,}"
    pages = sorted(path.name for path in (REPO / "docs").glob("*.md"))
    assert "reference.md" in pages
    unlinked = [name for name in pages if f"](docs/{name}" not in text]
    assert not unlinked, f"README.md does not link {unlinked}"
    assert "](benchmarks/README.md)" in text
    assert (REPO / "benchmarks" / "README.md").is_file()


@pytest.mark.parametrize(
    "page", ["reference.md", "reliability.md", "clusters.md", "performance.md", "gang.md"]
)
def test_relative_links_in_the_docs_resolve(page):
    path = REPO / "docs" / page
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", path.read_text()):
        if target.endswith("model.md"):
            continue  # written on the `model` branch, merged with this one
        assert (path.parent / target).exists(), f"{page} links {target}, which does not exist"

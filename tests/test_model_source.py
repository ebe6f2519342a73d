"""Models named by a Hub id (served offline from a cache laid out as the Hub lays it out) or by an s3:// URI
(on the tests' local S3 endpoint): fetched once, checked before Ray starts, loaded by the same code paths
that load a local directory, with the same weights and the same eval results."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pytest

from instune.errors import UserError

REVISION = "0123456789abcdef0123456789abcdef01234567"


def hub_cache_with(model_dir: Path, cache: Path, repo_id: str) -> Path:
    """Lay `model_dir` out in `cache` as huggingface_hub does: blobs named by content hash, a snapshot of
    relative symlinks per revision, and refs/main naming the revision. Returns the snapshot directory."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    for f in sorted(model_dir.iterdir()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        (repo / "blobs" / digest).write_bytes(f.read_bytes())
        os.symlink(Path("..", "..", "blobs", digest), snapshot / f.name)
    return snapshot


@pytest.fixture
def offline_hub(tmp_path, monkeypatch, tiny_model_dir):
    """An HF cache holding acme/tiny-chat, with HF_HUB_OFFLINE=1 and HF_HUB_CACHE pointing at it."""
    from instune import model_source

    cache = tmp_path / "hf_cache"
    snapshot = hub_cache_with(tiny_model_dir, cache, "acme/tiny-chat")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    model_source._fetched_once.cache_clear()
    yield snapshot
    model_source._fetched_once.cache_clear()


def state_dict_of(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def assert_same_weights(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_hub_id_resolves_from_the_offline_cache_and_loads_the_same_model(offline_hub, tiny_model_dir, tmp_path):
    from instune.base_model import resolve_base_model
    from instune.config import ModelConfig
    from instune.model_source import is_remote, local_model_dir

    model, tokenizer = resolve_base_model(ModelConfig(path="acme/tiny-chat"), tmp_path)
    # The id, not this node's cache path, is what workers get: each node resolves it in its own cache.
    assert (model, tokenizer) == ("acme/tiny-chat", "acme/tiny-chat")
    assert is_remote(model)
    assert Path(local_model_dir(model)) == offline_hub
    assert_same_weights(state_dict_of(local_model_dir(model)), state_dict_of(str(tiny_model_dir)))


def test_hub_id_trains_and_evaluates_like_the_local_directory(offline_hub, tiny_model_dir):
    """The per-worker loop's model and the eval worker load a Hub id through the same code as a directory."""
    import torch

    from instune.eval.evaluate import EvalSet, EvalSettings, evaluate_in_process
    from instune.train.loop import LoopSettings, build_model
    from instune.train.methods import MethodSettings

    settings = LoopSettings(model_path="acme/tiny-chat", total_steps=1, method=MethodSettings(method="full"))
    trained_from_hub = build_model(settings, torch.device("cpu")).state_dict()
    assert_same_weights(trained_from_hub, state_dict_of(str(tiny_model_dir)))

    records = [{"messages": [{"role": "user", "content": f"What is {i} + 1?"},
                             {"role": "assistant", "content": str(i + 1)}]} for i in range(3)]
    sets = [EvalSet("arith", "arithmetic", "in_domain", records)]
    eval_settings = EvalSettings(max_length=64, max_new_tokens=3, batch_size=4)
    from_hub, hub_predictions = evaluate_in_process("acme/tiny-chat", sets, eval_settings)
    local, local_predictions = evaluate_in_process(str(tiny_model_dir), sets, eval_settings)
    assert from_hub[0].loss == pytest.approx(local[0].loss, rel=1e-6)
    assert hub_predictions == local_predictions


def test_hub_id_missing_from_the_offline_cache_is_one_line_naming_the_field(offline_hub, tmp_path):
    from instune.base_model import resolve_base_model
    from instune.config import ModelConfig

    with pytest.raises(UserError) as e:
        resolve_base_model(ModelConfig(path="acme/not-cached"), tmp_path)
    message = str(e.value)
    assert message.startswith("model.path: acme/not-cached is not a local directory")
    assert "HF_HUB_OFFLINE is set" in message and "\n" not in message


def test_a_hub_model_is_checked_by_its_files_and_listing_without_its_weights(offline_hub, tmp_path):
    """The driver checks a Hub model by its config, tokenizer and file names; the weights are the workers'
    nodes' to fetch. Offline the listing is the cache's, so a cache without the weights is refused here."""
    from instune import model_source
    from instune.base_model import resolve_base_model
    from instune.config import ModelConfig

    files = model_source.model_files("acme/tiny-chat")
    assert files.directory == offline_hub
    assert {"config.json", "tokenizer.json", "model.safetensors"} <= set(files.names)
    (offline_hub / "model.safetensors").resolve().unlink()  # the blob: the snapshot's link now leads nowhere
    model_source._fetched_once.cache_clear()
    with pytest.raises(UserError, match=r"^model\.path: acme/tiny-chat has no weights \(\*\.safetensors or \*\.bin\)$"):
        resolve_base_model(ModelConfig(path="acme/tiny-chat"), tmp_path)


def test_eval_model_and_scoring_reference_accept_a_hub_id(offline_hub, tiny_model_dir):
    from instune.config import ScoreConfig
    from instune.data.prepare import score_arguments
    from instune.eval.load import check_eval_model

    assert check_eval_model("acme/tiny-chat", None) == "acme/tiny-chat"
    args = score_arguments(ScoreConfig(model_path="acme/tiny-chat"), None, "unused", 64, "prompt_left")
    assert (args["model_path"], args["tokenizer_path"]) == ("acme/tiny-chat", "acme/tiny-chat")
    with pytest.raises(UserError, match=r"^data\.score\.model_path: acme/gone is not a local directory"):
        score_arguments(ScoreConfig(model_path="acme/gone"), None, "unused", 64, "prompt_left")


def test_local_paths_are_never_taken_for_hub_ids(tiny_model_dir, tmp_path):
    from instune.model_source import is_hub_id, local_model_dir

    assert local_model_dir(str(tiny_model_dir)) == str(tiny_model_dir)
    assert not is_hub_id("/abs/missing/model")
    assert not is_hub_id("./relative")
    assert not is_hub_id("~/models/x")
    assert is_hub_id("Qwen/Qwen2.5-7B-Instruct")
    assert is_hub_id("acme/tiny@v1.0")


@pytest.mark.parametrize("written", ["./gone", "~/instune-no-such-dir/model", "/abs/missing/model", "runs/exp1/merged",
                                     "../gone"])
def test_a_missing_path_written_as_a_path_is_one_line_naming_the_field(written, monkeypatch):
    """Never tried on the Hub (that would be a long error from a worker, or a download of another model)."""
    from instune.base_model import resolve_base_model
    from instune.config import ModelConfig, ScoreConfig
    from instune.data.prepare import score_arguments
    from instune.model_source import local_model_dir

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # were it sent to the Hub, the error would say so
    with pytest.raises(UserError) as e:
        local_model_dir(written, "model.tokenizer_path")
    assert str(e.value) == (f"model.tokenizer_path: {written} does not exist (a local path; a Hub id is org/name, "
                            "a bucket s3://... or gs://...)")
    with pytest.raises(UserError, match=rf"^model\.path: {re.escape(written)} does not exist \(a local path"):
        resolve_base_model(ModelConfig(path=written), "/unused")
    with pytest.raises(UserError, match=rf"^data\.score\.model_path: {re.escape(written)} does not exist"):
        score_arguments(ScoreConfig(model_path=written), None, "unused", 64, "prompt_left")


def upload_dir(local: Path, uri_of) -> str:
    from instune import storage

    storage.upload_files(local, uri_of("models/tiny"))
    return uri_of("models/tiny")


@pytest.fixture
def model_cache(tmp_path, monkeypatch):
    from instune import model_source

    monkeypatch.setenv("INSTUNE_MODEL_CACHE", str(tmp_path / "model_cache"))
    model_source._fetched_once.cache_clear()
    yield tmp_path / "model_cache"
    model_source._fetched_once.cache_clear()


def test_s3_model_is_copied_once_then_reused_until_the_bucket_changes(s3_uri, model_cache, tiny_model_dir,
                                                                       tmp_path, capsys):
    from instune import model_source, storage
    from instune.base_model import resolve_base_model
    from instune.config import ModelConfig

    uri = upload_dir(tiny_model_dir, s3_uri)
    model, tokenizer = resolve_base_model(ModelConfig(path=uri), tmp_path)
    assert (model, tokenizer) == (uri, uri)
    copy = Path(model_source.local_model_dir(uri))
    assert copy.parent == model_cache
    assert sorted(p.name for p in tiny_model_dir.iterdir()) == \
        sorted(p.name for p in copy.iterdir() if p.name != model_source.LISTING_FILE)
    assert_same_weights(state_dict_of(str(copy)), state_dict_of(str(tiny_model_dir)))

    # Another process on this node (a worker) finds the copy current and copies nothing.
    model_source._fetched_once.cache_clear()
    capsys.readouterr()
    assert model_source.local_model_dir(uri) == str(copy)
    assert "copying" not in capsys.readouterr().out

    # A file replaced in the bucket (another size) makes the next fetch copy again.
    storage.write_text(storage.join(uri, "generation_config.json"), '{"do_sample": false, "max_length": 20}\n')
    model_source._fetched_once.cache_clear()
    assert model_source.local_model_dir(uri) == str(copy)
    assert "copying" in capsys.readouterr().out
    assert (copy / "generation_config.json").read_text() == '{"do_sample": false, "max_length": 20}\n'


def test_a_bucket_model_is_checked_on_the_driver_without_copying_its_weights(s3_uri, model_cache, tiny_model_dir,
                                                                            tmp_path):
    from instune.base_model import resolve_base_model
    from instune.config import ModelConfig, ScoreConfig
    from instune.data.prepare import score_arguments
    from instune.eval.load import check_eval_model
    from instune.model_source import local_model_dir

    uri = upload_dir(tiny_model_dir, s3_uri)
    assert resolve_base_model(ModelConfig(path=uri), tmp_path) == (uri, uri)
    assert check_eval_model(uri, None) == uri
    assert score_arguments(ScoreConfig(model_path=uri), None, "unused", 64, "prompt_left")["model_path"] == uri
    # Checked by the listing; the driver's node holds the config and the tokenizer, not the weights.
    [checked] = [p for p in model_cache.iterdir() if p.is_dir()]
    assert (checked / "config.json").is_file() and (checked / "tokenizer.json").is_file()
    assert list(model_cache.rglob("*.safetensors")) == []
    # A worker's node copies the whole model, weights included.
    assert [p.name for p in Path(local_model_dir(uri)).glob("*.safetensors")] == ["model.safetensors"]


def test_missing_bucket_model_is_one_line_naming_the_field(s3_uri, model_cache):
    from instune.eval.load import check_eval_model

    with pytest.raises(UserError, match=r"^--model: s3://.*/models/none.* holds no files"):
        check_eval_model(s3_uri("models/none"), None)

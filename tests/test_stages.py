"""Where stages write and publish: a local output_dir as it is, a URI output_dir through a scratch directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray

from instune import stages, storage
from instune.config import validate_config
from instune.errors import UserError


def config_for(output_dir: str, **extra):
    sources = [{"name": "a", "path": "a.jsonl"}]
    return validate_config({"name": "t", "output_dir": output_dir, "data": {"sources": sources}, **extra})


def test_a_local_output_dir_is_written_in_place_and_published_as_it_is(tmp_path):
    config = config_for(str(tmp_path / "exp"))
    assert stages.work_dir(config) == tmp_path / "exp"
    data = stages.output_paths(config)["data"]
    assert stages.published(config, data) == str(tmp_path / "exp" / "data")
    data.mkdir(parents=True)
    assert stages.publish(config, data) == str(data) and not (data / storage.SUCCESS).exists()


def test_a_uri_output_dir_works_in_scratch_and_publishes_there(s3_uri, tmp_path):
    uri = s3_uri("exp")
    config = config_for(uri, scratch_dir=str(tmp_path / "scratch"))
    assert stages.work_dir(config) == tmp_path / "scratch"
    default = config_for(uri)
    assert stages.work_dir(default) == stages.work_dir(config_for(uri))  # the same for every run
    assert stages.work_dir(default) != stages.work_dir(config_for(s3_uri("other")))

    adapter = stages.output_paths(config)["adapter"]
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    assert stages.publish(config, adapter) == storage.join(uri, "adapter")
    assert storage.is_complete(storage.join(uri, "adapter"))
    assert storage.read_text(storage.join(uri, "adapter", "adapter_config.json")) == "{}"


def test_the_default_scratch_dir_is_refused_on_a_cluster_of_several_nodes(tmp_path, monkeypatch):
    nodes = [{"Alive": True}, {"Alive": True}, {"Alive": False}]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    with pytest.raises(UserError, match=r"^scratch_dir: with output_dir s3://b/exp, prepare's .* the 1 other nodes"):
        stages.check_scratch_reachable(config_for("s3://b/exp"), "prepare's Ray Data tasks write the data")
    stages.check_scratch_reachable(config_for("s3://b/exp", scratch_dir=str(tmp_path)), "x")  # taken as shared
    stages.check_scratch_reachable(config_for(str(tmp_path)), "x")  # a local output_dir: nothing to check
    nodes.pop(0)
    stages.check_scratch_reachable(config_for("s3://b/exp"), "x")  # one node alive

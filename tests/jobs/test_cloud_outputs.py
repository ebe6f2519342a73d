"""A URI output_dir end to end, on a real S3 endpoint (moto on 127.0.0.1): prepare publishes the data to the
bucket, training reads its splits from there and keeps its checkpoints there (Ray Train's storage path), a
run started again on another machine (a fresh scratch directory) resumes from the bucket's checkpoint, and a
sweep keeps Tune's state and its trials in the bucket, and resumes from there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray

from instune import stages, storage


def cloud_overrides(uri: str, inputs: Path, scratch: Path) -> list[str]:
    """The tiny quickstart with its outputs in the bucket and its generated corpus (an input) on local disk."""
    return [f"output_dir={uri}", f"scratch_dir={scratch}", f"data.corpus.dir={inputs}",
            f"data.sources.0.path={inputs}/train/alpaca.jsonl", f"data.sources.1.path={inputs}/train/sharegpt.jsonl",
            f"eval.sets.0.path={inputs}/eval/arithmetic.jsonl"]


def bucket_steps(uri: str) -> list[int]:
    text = storage.read_text(storage.join(uri, "train", "run", "metrics.jsonl"))
    return [json.loads(line)["step"] for line in text.splitlines()]


@pytest.fixture
def ray_after_test():
    """The stages start Ray themselves (after the S3 credentials are in the environment); stop it after, and put
    back the RAY_ADDRESS start_ray exported (a later test's command would otherwise try to join a dead cluster)."""
    from instune.ray_runtime import stop_ray

    yield
    stop_ray()


# One trial on one worker, scored by its in-domain loss while it trains.
ONE_TRIAL_SWEEP = ["scaling.num_workers=1",
                   "sweep={search: grid, scheduler: fifo, objective: in_domain_loss, final_eval: false, "
                   "max_concurrent_trials: 1, params: {train.lr: {choice: [0.001]}}}"]


@pytest.mark.slow
def test_outputs_in_s3_training_and_sweeps_resume_from_the_bucket(s3_uri, tiny_config, tmp_path, ray_after_test):
    uri = s3_uri("experiments/tiny")
    inputs = tmp_path / "inputs"
    config = tiny_config(Path("/unused"), cloud_overrides(uri, inputs, tmp_path / "machine-a"), max_steps=2)

    manifest = stages.prepare_stage(config)
    assert storage.is_complete(storage.join(uri, "data"), "manifest.json")
    assert json.loads(storage.read_text(storage.join(uri, "data", "manifest.json"))) == \
        json.loads(json.dumps(manifest))
    assert manifest["splits"]["train"]["rows"] > 0
    for name in manifest["files"]:  # every Parquet file the manifest lists is in the bucket
        assert storage.is_file(storage.join(uri, "data", name)), name
    assert storage.total_size(storage.join(uri, "data", "train"), ".parquet") > 0
    assert "output_dir: s3://" in storage.read_text(storage.join(uri, "resolved_config.yaml"))

    first = stages.train_stage(config)
    assert first.final_metrics["step"] == 2 and bucket_steps(uri) == [1, 2]
    run_dir = storage.join(uri, "train", "run")
    first_checkpoints = storage.list_dirs(run_dir, "checkpoint_")
    assert len(first_checkpoints) == 1
    state = storage.read_text(storage.join(run_dir, first_checkpoints[0], "trainer_state.json"))
    assert json.loads(state)["step"] == 2
    assert storage.is_complete(storage.join(uri, "adapter"))
    assert storage.is_file(storage.join(uri, "adapter", "adapter_config.json"))
    assert storage.is_complete(storage.join(uri, "merged"))
    assert storage.is_file(storage.join(uri, "merged", "config.json"))
    # Checkpoints live in the bucket only; the scratch directory holds the base model and logs.
    assert not list((tmp_path / "machine-a").rglob("checkpoint_*"))

    # Started again with more steps on another machine (nothing local): it resumes from the step-2 checkpoint
    # in the bucket, reporting steps 3 and 4 after the metrics it downloaded (a fresh start would add 1, 2, 3, 4).
    machine_b = tmp_path / "machine-b"
    resumed = stages.train_stage(tiny_config(Path("/unused"), cloud_overrides(uri, inputs, machine_b), max_steps=4))
    assert resumed.final_metrics["step"] == 4
    assert bucket_steps(uri) == [1, 2, 3, 4]
    checkpoints = storage.list_dirs(run_dir, "checkpoint_")
    assert len(checkpoints) == 2 and checkpoints[0] == first_checkpoints[0]
    assert Path(resumed.adapter_dir).is_relative_to(machine_b) and list(Path(resumed.adapter_dir).glob("*.safetensors"))

    # A sweep on the same bucket (its data reused, downloaded into machine B's scratch for the trials to mix).
    sweep_config = tiny_config(Path("/unused"), cloud_overrides(uri, inputs, machine_b) + ONE_TRIAL_SWEEP,
                               max_steps=2)
    paths = stages.sweep_stage(sweep_config)
    sweep = storage.join(uri, "sweep")
    assert storage.is_file(storage.join(sweep, "tune", "tuner.pkl"))  # Tune's experiment state
    [trial] = storage.list_dirs(storage.join(sweep, "trials"))
    trial_dir = storage.join(sweep, "trials", trial)
    assert len(storage.list_dirs(storage.join(trial_dir, "train", "run"), "checkpoint_")) == 1
    final = storage.read_text(storage.join(trial_dir, "final.json"))
    assert json.loads(final)["step"] == 2
    results = storage.read_text(storage.join(sweep, "results.csv"))
    assert storage.read_bytes(storage.join(sweep, "results.csv")) == paths.results_csv.read_bytes()
    assert f"1,{trial},finished," in results
    best = storage.read_text(storage.join(sweep, "best_config.yaml"))
    assert f"output_dir: {storage.join(uri, 'best')}" in best

    # Run again: Tune restores the finished sweep from the bucket and runs no trial again.
    stages.sweep_stage(sweep_config)
    assert storage.read_text(storage.join(trial_dir, "final.json")) == final

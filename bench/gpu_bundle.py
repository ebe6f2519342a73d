"""Build the wheels a GPU machine without Ray or DeepSpeed needs to run `instune train` (Ray Train + Ray Data,
DDP or DeepSpeed ZeRO) and bench/train_gpu.py, small enough to carry (64 MiB):

    python bench/gpu_bundle.py [--out .whl] [--limit-mib 64]

The target is the GPU image of the device machines: CPython 3.12 on x86-64 with torch, transformers, peft,
triton, pandas, pyarrow and most of Ray's dependencies, but not these (checked against that image's package
list): Ray itself; jsonschema and its parts (Ray's core); pydantic and its parts (instune's config, Ray Train,
DeepSpeed); tensorboardX (Ray Train/Tune); DeepSpeed and hjson; liger-kernel (model.kernels: liger).

- Ray's cp312 wheel is 79 MB, but 32 MB of it is ray/jars/ray_dist.jar, used only by Java workers: the copy
  here leaves it (and its RECORD line) out.
- DeepSpeed publishes a source archive only; it is built here into a pure-Python wheel with DS_BUILD_OPS=0
  (no CUDA extension compiled ahead; the loop passes torch's own optimizers, so none is needed).
- Versions are those of this environment, so the GPU runs the code the tests here ran.

On the device machine (wheels unpacked beside the image's packages; the repo travels as the working tree):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD

Prints each wheel's size and the total, and exits non-zero when the total is over the limit.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What the image lacks. Binary wheels are fetched for cp312 / manylinux x86-64; the rest are pure Python.
BINARY = ["ray", "pydantic-core", "rpds-py"]
PURE = ["jsonschema", "jsonschema-specifications", "referencing", "pydantic", "annotated-types",
        "typing-inspection", "tensorboardX", "hjson", "liger-kernel"]
# Versions for packages this environment does not hold (liger-kernel is the `gpu` extra).
FALLBACK_VERSIONS = {"liger-kernel": "0.8.5"}
PLATFORMS = ["manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_24_x86_64", "manylinux_2_28_x86_64",
             "manylinux_2_34_x86_64"]
JAVA_JAR = "ray/jars/ray_dist.jar"


def version_of(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return FALLBACK_VERSIONS[name]


def download(names: list[str], out: Path, binary: bool) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(out)]
    if binary:
        cmd += ["--python-version", "3.12", "--implementation", "cp"]
        for platform in PLATFORMS:
            cmd += ["--platform", platform]
    subprocess.run(cmd + [f"{n}=={version_of(n)}" for n in names], check=True)


def strip_java(wheel: Path) -> int:
    """Rewrite Ray's wheel without the Java workers' jar; returns the bytes saved."""
    before = wheel.stat().st_size
    stripped = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(stripped, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if item.filename == JAVA_JAR:
                continue
            data = src.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                data = b"".join(line for line in data.splitlines(keepends=True)
                                if not line.startswith(JAVA_JAR.encode() + b","))
            dst.writestr(item, data, compress_type=item.compress_type)
    stripped.replace(wheel)
    return before - wheel.stat().st_size


def build_deepspeed(out: Path) -> None:
    """DeepSpeed's wheel, built from its source archive with no ops compiled (needs torch here, as its
    setup.py imports it)."""
    env = dict(os.environ, DS_BUILD_OPS="0", DS_BUILD_AIO="0", DS_BUILD_GDS="0")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--no-binary", "deepspeed", "-w", str(out), f"deepspeed=={version_of('deepspeed')}"],
                   check=True, env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / ".whl"))
    parser.add_argument("--limit-mib", type=float, default=64)
    args = parser.parse_args()
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp)
        download(BINARY, staging, binary=True)
        download(PURE, staging, binary=False)
        build_deepspeed(staging)
        ray_wheel = next(staging.glob("ray-*.whl"))
        saved = strip_java(ray_wheel)
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(staging, out)
    wheels = sorted(out.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels)
    for wheel in wheels:
        print(f"{wheel.stat().st_size / 2**20:8.2f} MiB  {wheel.name}")
    print(f"{total / 2**20:8.2f} MiB  total in {out} ({len(wheels)} wheels; {saved / 2**20:.1f} MiB of Java jar "
          f"left out of Ray's); limit {args.limit_mib:g} MiB")
    if total > args.limit_mib * 2**20:
        sys.exit(f"the bundle is {total / 2**20:.1f} MiB, over the {args.limit_mib:g} MiB limit")


if __name__ == "__main__":
    main()

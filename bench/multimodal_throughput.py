"""Multimodal benchmark: images/s through prepare against decoding alone, and training tokens/s with images
against text only, on the same cores and the same model.

    python bench/multimodal_throughput.py [--images 4000] [--size 96] [--workdir /tmp/instune-mm-bench]
                                          [--steps 20] [--rounds 3]

1. Writes `--images` PNG files (`--size` pixels square, noise so they do not compress to nothing) and a
   LLaVA JSON corpus naming them, in one file. The baseline decodes, checks and resizes every file with Pillow
   (images.decode_image + resized_png, what prepare does per image) in a process pool using every core.
   `prepare_multimodal` runs on a local Ray cluster with as many CPUs (read, decode, resize, exact dedup,
   tokenize with the processor, write). Fixed start-up is counted for neither side, as in
   bench/dedup_side_by_side.py: before the clock the pool's workers start and decode a few files, and the Ray
   cluster starts and runs prepare on the corpus's first 2 x cores x IMAGE_BLOCK_ROWS records, so its workers
   have imported transformers and torch and loaded the processor (that warm-up's seconds are printed, not
   counted). Then `--rounds` rounds, decode and prepare taking turns so that both see the same load; best
   of each. Ratio = prepare images/s / decode images/s. Also printed: CPU milliseconds per image of each side
   (every process of this process tree while it runs), which moves much less than wall time with the load of
   other jobs on a shared machine: the wall ratio approaches the CPU ratio when every core is free.
2. Trains the embedded VLM through the per-worker loop (one process, LoRA) for `--steps` steps on rows with
   one image each, and on the same rows with the image removed (text only, same prompts and answers), and
   prints tokens/s of both (every position computed, image tokens included) and their ratio. `--steps 0`
   leaves it out.

Measured (2 cores shared with other jobs, load 6-13; 4000 images of 96x96, `--steps 0 --rounds 3`; before and
after alternated, same seeded corpus). Before: the image tasks ran one at a time (Ray Data gave exact dedup's
key-and-write operator its own share of the 2 CPUs), and filtered/ was written, then read back to tokenize in a
third Ray Data job. After: those maps run in the image tasks, and the tasks that write filtered/ tokenize.
                         decode images/s  prepare images/s  ratio   CPU ms/image decode  prepare  CPU ratio
    before, run 1              3438              514          0.15               0.46      1.53      0.30
    after,  run 1              1463              535          0.37               0.47      1.27      0.37
    before, run 2              1898              573          0.30               0.48      1.57      0.31
    after,  run 2              4818             1010          0.21               0.41      1.12      0.36
The decode baseline moved 3x between runs with the other jobs' load, so these wall ratios say little; CPU per
image is steadier: prepare went from ~1.55 to ~1.2 ms an image, against 0.41-0.48 for decoding alone. Below 0.7
on these small images: measured in one process (CPU time, 1024 images), prepare's own work is decode, check and
resize 0.48 ms (the baseline's 0.47), tokenize 0.17 (pixel values 0.08, chat template and tokenizer 0.05), the
Parquet writes 0.07, read and dedup keys 0.05; Ray Data's tasks, block transfers and scheduling (workers ~1.05
ms an image in all, driver and raylet ~0.2) make up the rest. Larger images cost more to decode and the same
to tokenize: with 2000 images of 384x384 (`--size 384 --rounds 2`, load 4-10), before: decode 594 images/s,
prepare 210 (ratio 0.35; CPU 3.33 against 4.98 ms an image, 0.67); after, two runs: decode 272 and 364, prepare
196 and 237 (ratio 0.72 and 0.65; CPU 3.60 against 5.11 ms, 0.71, and 3.69 against 4.97, 0.74).
Training (`--steps 20`, load ~6): 16,382 tokens/s with images, 18,738 text only (ratio 0.87).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def write_corpus(directory: Path, images: int, size: int) -> Path:
    from PIL import Image

    (directory / "img").mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    records = []
    for i in range(images):
        image = Image.effect_noise((size, size), 40 + rng.random() * 20).convert("RGB")
        image.save(directory / "img" / f"{i}.png")
        records.append({"image": f"img/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the shape?"},
            {"from": "gpt", "value": rng.choice(["red", "green", "blue", "yellow"])}]})
    (directory / "corpus.json").write_text(json.dumps(records))
    return directory / "corpus.json"


def _decode_files(paths: list[str]) -> int:
    from instune.data.images import ImageLimits, decode_image, resized_png

    limits = ImageLimits()
    for path in paths:
        with open(path, "rb") as f:
            resized_png(decode_image(f.read(), limits), limits.size)
    return len(paths)


def warmup_corpus(corpus: Path, records: int) -> Path:
    """The first `records` records of `corpus`, in a file beside it (the same images)."""
    warmup = corpus.with_name("warmup.json")
    warmup.write_text(json.dumps(json.loads(corpus.read_text())[:records]))
    return warmup


def tree_cpu_seconds() -> float:
    """CPU seconds used so far by this process and every live process under it (the decode pool, and the Ray
    cluster's GCS, raylet and workers, which init_local_ray starts as children)."""
    import psutil

    total = 0.0
    for process in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def side_by_side(corpus: Path, model_dir: str, out: Path, cores: int, rounds: int) -> dict:
    """Best wall and CPU seconds of `rounds` of decoding every image alone and of `prepare_multimodal` on the
    corpus, the two taking turns, each on `cores` processes started and warmed before the clock; and the
    warm-up's seconds.

    Fixed start-up is counted on neither side: the process pool's workers import Pillow and decode, and the
    Ray cluster (`cores` CPUs) starts and runs prepare on a few blocks of the corpus (so its workers import
    transformers and torch and load the processor), before any timed round. CPU seconds are every process's of
    this tree while a side runs (the other side's idle processes add a little)."""
    import ray

    from instune.data.images import ImageLimits
    from instune.data.prepare_multimodal import IMAGE_BLOCK_ROWS, MultimodalSource, prepare_multimodal
    from ray_start import init_local_ray  # bench/ is this script's directory

    paths = sorted(str(p) for p in (corpus.parent / "img").glob("*.png"))
    chunks = [paths[i::cores * 4] for i in range(cores * 4)]

    def prepare(file: Path) -> dict:
        shutil.rmtree(out, ignore_errors=True)
        return prepare_multimodal([MultimodalSource("bench", "bench", "llava", [str(file)])], model_dir, out,
                                  limits=ImageLimits(), max_length=64)

    times = {"decode": [], "prepare": [], "decode_cpu": [], "prepare_cpu": []}
    with ProcessPoolExecutor(cores) as pool:
        list(pool.map(_decode_files, chunks[:cores]))  # the workers import and decode before timing
        init_local_ray(cores)
        try:
            started = time.perf_counter()
            prepare(warmup_corpus(corpus, 2 * cores * IMAGE_BLOCK_ROWS))
            times["warmup"] = time.perf_counter() - started
            for _ in range(rounds):
                started, cpu = time.perf_counter(), tree_cpu_seconds()
                assert sum(pool.map(_decode_files, chunks)) == len(paths)
                times["decode"].append(time.perf_counter() - started)
                times["decode_cpu"].append(tree_cpu_seconds() - cpu)
                started, cpu = time.perf_counter(), tree_cpu_seconds()
                counts = prepare(corpus)["sources"]["bench"]
                times["prepare"].append(time.perf_counter() - started)
                times["prepare_cpu"].append(tree_cpu_seconds() - cpu)
                assert counts["read"] == counts["kept"] == counts["tokenized"] == len(paths), counts
        finally:
            ray.shutdown()
    return {**{side: min(values) for side, values in times.items() if side != "warmup"}, "warmup": times["warmup"]}


def training_tokens_per_second(model_dir: str, work: Path, steps: int) -> tuple[float, float]:
    """(tokens/s with images, tokens/s text only) over `steps` LoRA steps each, after 2 warm-up steps."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    from transformers import AutoProcessor

    from instune.data.multimodal_tokenize import image_tokens, tokenize_multimodal
    from instune.data.prepare_multimodal import TOKENIZED_SCHEMA
    from instune.train.loop import LoopSettings, run_training
    from instune.train.methods import MethodSettings
    from instune.train.sessions import FileSession

    processor = AutoProcessor.from_pretrained(model_dir)
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buffer, format="PNG")
    question = [{"role": "assistant", "content": "red"}]
    rates = []
    for with_image in (True, False):
        prompt = "<image>\nWhat colour is the shape?" if with_image else "What colour is the shape?"
        records = [{"messages": [{"role": "user", "content": prompt}] + question,
                    "images": [buffer.getvalue()] if with_image else []}] * 256
        rows = tokenize_multimodal(records, processor, image_tokens(processor), max_length=128)
        rows_dir = work / f"rows-{with_image}"
        rows_dir.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist([{"id": str(i), "source": "b", "domain": "b", "metadata": "{}", **r}
                                             for i, r in enumerate(rows)], schema=TOKENIZED_SCHEMA),
                       rows_dir / "part.parquet")
        output = work / f"train-{with_image}"
        settings = LoopSettings(model_path=model_dir, total_steps=steps + 2, method=MethodSettings(method="lora"),
                                micro_batch_size=16, log_every=2, checkpoint_every=None, warmup_ratio=0)
        run_training(settings, FileSession({"train": [str(rows_dir / "part.parquet")]}, str(output)))
        metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
        rates.append(sum(m["tokens_per_second"] for m in metrics[1:]) / len(metrics[1:]))
    return rates[0], rates[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--steps", type=int, default=20, help="training steps per side; 0 leaves training out")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of decode and of warm prepare (best)")
    parser.add_argument("--workdir", default="/tmp/instune-mm-bench")
    args = parser.parse_args()
    from instune.default.image_tasks import PROMPTS
    from instune.default.vlm import ensure_embedded_vlm

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    cores = os.cpu_count() or 1
    corpus = write_corpus(work / "corpus", args.images, args.size)
    model_dir = str(ensure_embedded_vlm(work / "model", [p for ps in PROMPTS.values() for p in ps] * 10))
    seconds = side_by_side(corpus, model_dir, work / "prepared", cores, args.rounds)
    with_images, text_only = (training_tokens_per_second(model_dir, work, args.steps) if args.steps
                              else (float("nan"), float("nan")))
    rows = [("decode + check + resize alone (images/s)", args.images / seconds["decode"]),
            ("prepare (images/s)", args.images / seconds["prepare"]),
            ("ratio prepare / decode (target >= 0.7)", seconds["decode"] / seconds["prepare"]),
            ("decode alone, CPU ms per image", 1000 * seconds["decode_cpu"] / args.images),
            ("prepare, CPU ms per image", 1000 * seconds["prepare_cpu"] / args.images),
            ("ratio of CPU per image, decode / prepare", seconds["decode_cpu"] / seconds["prepare_cpu"]),
            ("start-up and warm-up, not counted (s)", seconds["warmup"]),
            ("train tokens/s with images", with_images),
            ("train tokens/s text only", text_only),
            ("ratio with images / text only", with_images / text_only)]
    print(f"{args.images} images of {args.size}x{args.size} px, {cores} cores")
    for name, value in rows:
        print(f"{name:<45}{value:>12.2f}")


if __name__ == "__main__":
    main()

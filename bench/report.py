"""Assemble BENCHMARKS.md from the sections the benchmark scripts wrote under bench/results/.

    python -m bench.report [--results bench/results] [--output BENCHMARKS.md]
    python -m bench.report --render [NAME ...]   # rewrite <name>.md from <name>.json first (default: every section)

Each script writes `<name>.json` (every number) and `<name>.md` (its section, the `markdown(report)` of its module);
this puts the sections in order under one header, so BENCHMARKS.md never holds a number the JSON lacks.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from bench.common import RESULTS_DIR, ROOT

# (results name, command, whether `make bench-quick` smoke-tests it: the side runs use the same script); the module
# that renders a section is the command's
SECTIONS = [
    ("engine_throughput", "python -m bench.engine_throughput", True),
    # Peak memory and tokens/s with optim.activation_checkpointing off and on: SmolLM2 and a 1.1B Llama (about 10 minutes).
    ("engine_activation_checkpointing", "python -m bench.engine_throughput --activation-checkpointing", False),
    # Each tuning method's learning rate, on first-task records the benchmark never reads.
    ("cl_quality_sweep", "python -m bench.cl_quality --sweep", False),
    ("cl_quality", "python -m bench.cl_quality", True),
    # The second task order the literature averages over, for the five methods the orderings compare.
    ("cl_quality_order-agnews-dbpedia-amazon",
     "python -m bench.cl_quality --order agnews dbpedia amazon --methods full attn-proj lora replay-10% seekr-1% --seeds 0", False),
    # A lineage that continues its champion beside one that retrains the history from the base (about 65 minutes).
    ("lineage", "python -m bench.lineage --threads 1", False),
    # Ten nightly retrains of one lineage with the retention policy on and off: S3, local and MLflow bytes.
    ("retention", "python -m bench.retention", False),
    # Ingestion beside plain Hugging Face `datasets`, incremental ticks, peak RSS to 10M records (about
    # 20 minutes on 2 cores); its smoke run is `python -m bench.ingest_scaling --quick` (tests/test_bench_ingest.py).
    ("ingest_scaling", "python -m bench.ingest_scaling", False),
]


# Sections measured on a CUDA device (bench/gpu.py, once one is lent): published after SECTIONS where their .md
# exists, and not missing before.
DEVICE_SECTIONS = [
    ("gpu", "python -m bench.gpu", False),
    ("cl_quality_gpu", "python -m bench.cl_quality --methods full attn-proj replay-10% seekr-1% --seeds 0 --name cl_quality_gpu", False),
]


def render(name: str, results: Path = RESULTS_DIR) -> str:
    """Section `name` as its benchmark renders it from `<name>.json`."""
    module = next(command for section, command, _ in SECTIONS + DEVICE_SECTIONS if section == name).split()[2]
    return importlib.import_module(module).markdown(json.loads((results / f"{name}.json").read_text()))

HEADER = """# Benchmarks

Written by `make bench` (everything, about {minutes}) or `make bench-quick` (a smoke run of the
engine and CL quality scripts side by side, about 3 minutes on 2 CPU cores, into bench/results/quick/;
its numbers only show that the scripts work). Each section
names the exact command that reproduces it and the machine it ran on; the numbers come from the
JSON beside each section in `{results}/`. Ratios are measured side by side in one run.

"""


def assemble(results: Path, quick: bool = False) -> str:
    sections, missing = [], []
    for name, command, in_quick in SECTIONS:
        if quick and not in_quick:
            continue
        path = results / f"{name}.md"
        if path.exists():
            sections.append(path.read_text().rstrip() + "\n")
        else:
            missing.append(f"- `{command}` has not been run yet (no {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}).")
    sections += [(results / f"{name}.md").read_text().rstrip() + "\n" for name, _, _ in ([] if quick else DEVICE_SECTIONS)
                 if (results / f"{name}.md").exists()]
    text = HEADER.format(minutes="9 hours on 2 CPU cores; the CL quality runs resume if interrupted", results=results.relative_to(ROOT) if results.is_relative_to(ROOT) else results)
    if missing:
        text += "Missing sections:\n\n" + "\n".join(missing) + "\n\n"
    return text + "\n".join(sections)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="folder of <name>.md sections")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--quick", action="store_true", help="the smoke run's results: leave out the side runs it does not make")
    parser.add_argument("--render", nargs="*", metavar="NAME", help="first rewrite these sections' .md from their JSON (none named: every one)")
    args = parser.parse_args(argv)
    for name in [] if args.render is None else args.render or [n for n, _, _ in SECTIONS + DEVICE_SECTIONS if (args.results / f"{n}.json").exists()]:
        (args.results / f"{name}.md").write_text(render(name, args.results).rstrip() + "\n")
        print(f"rendered {args.results / f'{name}.md'}")
    args.output.write_text(assemble(args.results.resolve(), args.quick))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

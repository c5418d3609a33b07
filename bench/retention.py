"""Ten nightly retrains of one lineage, with the retention policy on and off: what S3 and local disk hold.

    python -m bench.retention [--nights 10] [--quick]

A production lineage on the demo model (configs/demo.yaml, SmolLM2-135M-Instruct, attn-proj pinned): the
general and domain text and each night's new instruction records arrive under `incoming/` in S3, and every
night continues the champion (`lineage.continue_from=champion`) and trains the night's new task only. Two
lineages run side by side in one invocation, each in its own bucket so their bytes are theirs:
- **policy on**: the default policy (`retention:`), except `min_age_hours=0`: the default 24 h would keep
  every object of a benchmark that runs in an hour;
- **policy off**: `retention.enabled=false`, what every retrain kept before.
After each night it records the bucket's bytes and objects, the bytes the night added, the local work
directory's bytes and the MLflow artifacts of the lineage's experiment. After the last night it computes
the bound the policy must meet: the distinct bytes that the kept versions (aliases and the last
`keep_last_versions`: checkpoint, replay buffer, lineage record, MLflow model, the DAP model their run trained
from), the base models and the dataset versions reference, plus one full checkpoint in flight. Resumable: finished nights are kept in `<state-dir>/nights.json`; a killed night resumes under
its run key.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path


from bench.common import RESULTS_DIR, command, machine, machine_line, table, write_results

ROOT = Path(__file__).resolve().parent.parent
TASKS = ["fact_lookup", "arithmetic", "zorbish", "reverse", "uppercase", "word_count"]
POLICIES = {"policy on": ["retention.min_age_hours=0"], "policy off": ["retention.enabled=false"]}
GATES_OFF = ("registry.gates={min_target_score: null, min_bwt: null, max_task_drop: null, min_chance_margin: null, "
             "max_general_ppl_ratio: null, max_general_ppl_ratio_vs_base: null, max_general_task_drop: null, "
             "max_output_drift_kl: null}")
SERVICES_BUCKET = "bench-retention"  # MLflow's artifacts; each lineage has a bucket of its own (bucket())
LINEAGE_TARGET, STAGE_TARGET = 3.0, 0.40  # × one full checkpoint (issue #45)


def bucket(policy: str) -> str:
    return "retention-" + policy.split()[1]


def config(policy: str, args: argparse.Namespace, work: Path):
    from perennial.config import build_config, load_config

    name = bucket(policy)

    def dataset(kind: str, shape: str, role: str | None, new_data: str) -> dict:
        spec = {"name": kind, "shape": shape, "sources": [{"uri": f"s3://{name}/incoming/{kind}/"}], "incremental": {"new_data": new_data}}
        return {**spec, "role": role} if role else spec

    overrides = [f"storage.bucket={name}", f"tracking.registered_model=bench-{name}", f"tracking.experiment=bench-{name}",
                 f"work_dir={work / name}", "lineage.continue_from=champion", "registry.auto_promote=true", GATES_OFF,
                 "registry.samples.enabled=false", "cit.tuning.method=attn-proj", "cit.methods=[]",
                 f"cit.optim.max_steps={args.steps}", f"dap.optim.max_steps={args.steps}", "eval.max_task_records=8",
                 "eval.max_new_tokens=8", "eval.general_max_docs=10", "eval.probe_prompts=8", *POLICIES[policy]]
    data = load_config(str(ROOT / "configs" / "demo.yaml"), overrides).model_dump(mode="json")
    data["data"] = {"source": "datasets", "datasets": [dataset("general", "text", "general", "append"),
                                                       dataset("domain", "text", "domain", "append"),
                                                       dataset("tasks", "instruction", None, "next_task")]}
    return build_config(data)


def publish(store, night: int, first: bool) -> None:
    """The night's new records under incoming/ (night 1 also the general and domain text)."""
    from perennial import demo_data

    def put(key: str, rows: list[dict]) -> None:
        store.put_bytes(key, "".join(json.dumps(row) + "\n" for row in rows).encode())

    if first:
        put("incoming/general/day1.jsonl", [{"text": t, "split": "test" if i < 10 else "train"}
                                            for i, t in enumerate(demo_data.general_corpus(160, 7))])
        put("incoming/domain/day1.jsonl", [{"text": t, "split": "train"} for t in demo_data.domain_corpus(60, 7)])
    task = demo_data.demo_tasks(100 + night)[TASKS[(night - 1) % len(TASKS)]]
    put(f"incoming/tasks/night-{night:02d}.jsonl", demo_data.task_records(task, 48, 8, 100 + night))


def footprint(store, client, cfg) -> dict:
    objects = list(store.list(""))
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    mlflow_bytes = 0
    if experiment is not None:
        artifacts = store.__class__(cfg.storage.model_copy(update={"bucket": SERVICES_BUCKET}))
        mlflow_bytes = sum(i.size for i in artifacts.list(f"mlflow-artifacts/{experiment.experiment_id}/"))
    work = Path(cfg.work_dir)
    local = sum(f.stat().st_size for f in work.rglob("*") if f.is_file()) if work.exists() else 0
    return {"s3_bytes": sum(i.size for i in objects), "s3_objects": len(objects), "local_bytes": local, "mlflow_bytes": mlflow_bytes}


def needed(store, client, cfg) -> dict:
    """The distinct bytes the policy must keep: what the kept versions' folders (checkpoint, replay buffer, lineage
    record, MLflow model), the DAP models their runs trained from, the base models and the dataset versions reference
    (their files and checkpoint pieces), and one full checkpoint's size."""
    from perennial.model_files import registered_folder
    from perennial.storage import MANIFEST_NAME
    from tasks.dap import DAP_MODEL_TAG
    from tasks.gc import kept_versions, model_file_sizes
    from tasks.runtime import Services, uri_to_prefix

    kept, versions = kept_versions(cfg, Services.open(cfg))
    folders = {uri_to_prefix(store, versions[v].tags[tag]) for v in kept for tag in ("checkpoint_uri", "replay_uri", "lineage_uri")
               if versions[v].tags.get(tag)}
    folders |= {registered_folder(versions[v].source) for v in kept} - {None}
    folders |= {uri_to_prefix(store, tags[DAP_MODEL_TAG]) for tags in (client.get_run(versions[v].run_id).data.tags for v in kept)
                if DAP_MODEL_TAG in tags}
    shared = [i.key[: -len(MANIFEST_NAME) - 1] for i in store.list(cfg.storage.prefix + "/") if i.key.endswith("/" + MANIFEST_NAME)
              and any(f"/{kind}/" in i.key for kind in ("base-models", "datasets")) and "/checkpoints/" not in i.key]
    # a full copy in MLflow's artifact store, for a version whose model is not stored beside its checkpoint
    models = sum(sum(model_file_sizes(client, source)) for source in {versions[v].source for v in kept} if registered_folder(source) is None)
    files, pieces, full = 0, {}, 0
    for prefix in folders | set(shared):
        manifest = store.read_manifest(prefix)
        for entry in manifest["files"].values():
            if "pieces" in entry:
                pieces.update(dict(entry["pieces"]))
                full = max(full, entry["size"])
            else:
                files += entry["size"]
    return {"kept_versions": sorted(kept, key=int), "bytes": files + sum(pieces.values()), "mlflow_bytes": models, "full_checkpoint": full}


def run_night(policy: str, night: int, args: argparse.Namespace, work: Path, before: dict | None) -> dict:
    from flows.continual_retrain import continual_retrain
    from mlflow.tracking import MlflowClient
    from tasks.runtime import Services

    cfg = config(policy, args, work)
    store = Services.open(cfg).store
    store.ensure_bucket()
    publish(store, night, first=night == 1)
    started = time.perf_counter()
    summary = continual_retrain(config=cfg.model_dump(mode="json"), run_key=f"night-{night:02d}")
    row = {"policy": policy, "night": night, "trained": summary["trained"], "wall_s": round(time.perf_counter() - started, 1),
           "gc": summary.get("gc"), **footprint(store, MlflowClient(), cfg)}
    row["added_bytes"] = row["s3_bytes"] - (before or {}).get("s3_bytes", 0)
    row["needed"] = needed(store, MlflowClient(), cfg)
    return row


def verdicts(nights: list[dict]) -> dict:
    last = {policy: max((n for n in nights if n["policy"] == policy), key=lambda n: n["night"], default=None) for policy in POLICIES}
    off = sorted((n for n in nights if n["policy"] == "policy off"), key=lambda n: n["night"])
    result = {}
    on = last["policy on"]
    if on:
        full = on["needed"]["full_checkpoint"]
        bound = on["needed"]["bytes"] + full
        result["bound"] = {"s3_bytes": on["s3_bytes"], "needed": on["needed"]["bytes"], "bound": bound, "holds": on["s3_bytes"] <= bound,
                           "x_full": on["s3_bytes"] / full, "holds_3x": on["s3_bytes"] <= LINEAGE_TARGET * full,
                           "mlflow_bytes": on["mlflow_bytes"], "mlflow_needed": on["needed"]["mlflow_bytes"],
                           "x_full_with_mlflow": (on["s3_bytes"] + on["mlflow_bytes"]) / full}
        if last["policy off"]:
            result["bound"]["off_with_mlflow"] = (last["policy off"]["s3_bytes"] + last["policy off"]["mlflow_bytes"]) / full
    if len(off) >= 3:  # night 1 holds the base and DAP models; later nights add one attn-proj stage each
        added = [n["added_bytes"] / n["needed"]["full_checkpoint"] for n in off[1:]]
        result["stage"] = {"max_x_full": max(added), "mean_x_full": sum(added) / len(added), "holds": max(added) <= STAGE_TARGET}
    return result


def _gb(count: int) -> str:
    return f"{count / 1e9:.2f}"


def markdown(report: dict) -> str:
    rows = [[n["night"], n["policy"], _gb(n["s3_bytes"]), f"{n['s3_objects']:,}", f"{n['added_bytes'] / 1e9:+.2f}",
             _gb(n["local_bytes"]), _gb(n["mlflow_bytes"]), (n.get("gc") or {}).get("deleted", "—")]
            for n in sorted(report["nights"], key=lambda n: (n["night"], n["policy"]))]
    lines = ["## Retention: ten retrains of one lineage, policy on and off (issue #45)", "",
             f"`{report['command']}`, {report['measured_at']}. {machine_line(report['machine'])}", "", report["description"], "",
             table(["night", "lineage", "S3 GB", "S3 objects", "added GB", "local GB", "MLflow artifacts GB", "gc deletions"], rows), ""]
    verdict = report["verdicts"]
    if "bound" in verdict:
        b = verdict["bound"]
        lines.append(f"- **Policy on, after the last night: S3 holds {_gb(b['s3_bytes'])} GB; the kept versions, base model and "
                     f"data reference {_gb(b['needed'])} GB; bound with one checkpoint in flight {_gb(b['bound'])} GB: "
                     f"{'holds' if b['holds'] else 'does not hold'}.** That is ×{b['x_full']:.2f} one full checkpoint (target ≤ "
                     f"×{LINEAGE_TARGET:g}: {'holds' if b['holds_3x'] else 'does not hold'}).")
        lines.append(f"- **MLflow's artifact store** (the services' bucket, `mlflow-artifacts/`: reports, plots and any full model "
                     f"copies) holds {_gb(b['mlflow_bytes'])} GB with the policy on; kept versions' full copies there: "
                     f"{_gb(b['mlflow_needed'])} GB. Lineage bucket and MLflow together: ×{b['x_full_with_mlflow']:.2f} one full "
                     "checkpoint with the policy on" + (f", ×{b['off_with_mlflow']:.2f} with it off." if "off_with_mlflow" in b else "."))
    if "stage" in verdict:
        s = verdict["stage"]
        lines.append(f"- **Policy off, each night after the first adds ×{s['mean_x_full']:.2f} of a full checkpoint on average, "
                     f"×{s['max_x_full']:.2f} at most** (target ≤ ×{STAGE_TARGET:g}: {'holds' if s['holds'] else 'does not hold'}): the "
                     "attention tensors it trained, its mid-stage checkpoints, replay buffer, data and records.")
    lines.append("- Each registered version's MLflow model (its source, which `mlflow.transformers.load_model` reads) lies in the "
                 "lineage's bucket beside its checkpoint (`registry.model_files: checkpoint`): its weights are the checkpoint's "
                 "pieces, so it adds its small files only. The policy deletes it for versions that are no longer kept "
                 "(`retention.delete_unkept_models`).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nights", type=int, default=10, help="retrains per lineage (default 10)")
    parser.add_argument("--steps", type=int, default=8, help="DAP and CIT steps (default 8: storage does not depend on them)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 nights, 2 steps")
    parser.add_argument("--state-dir", type=Path, default=ROOT / ".perennial" / "bench" / "retention")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.quick:
        args.nights, args.steps, args.state_dir = 3, 2, args.state_dir.with_name(args.state_dir.name + "-quick")
    from app.services import running_services

    done = args.state_dir / "nights.json"
    nights = json.loads(done.read_text()) if done.exists() else []
    with running_services(args.state_dir / "services", bucket=SERVICES_BUCKET):
        for night in range(1, args.nights + 1):
            for policy in POLICIES:
                if any(n["night"] == night and n["policy"] == policy for n in nights):
                    continue
                before = max((n for n in nights if n["policy"] == policy), key=lambda n: n["night"], default=None)
                nights.append(run_night(policy, night, args, args.state_dir / "work", before))
                done.write_text(json.dumps(nights, indent=2))
                n = nights[-1]
                print(f"night {night}, {policy}: S3 {_gb(n['s3_bytes'])} GB ({n['added_bytes'] / 1e9:+.2f}), local {_gb(n['local_bytes'])} GB, "
                      f"{n['wall_s'] / 60:.1f} min", flush=True)
    report = {"command": command("bench.retention", argv), "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "settings": vars(args) | {"state_dir": str(args.state_dir), "output_dir": str(args.output_dir)},
              "description": (f"{args.nights} nightly retrains of one lineage on SmolLM2-135M-Instruct (configs/demo.yaml, attn-proj, "
                              f"{args.steps} DAP and CIT steps), each continuing the champion and training the night's new task, "
                              "every gate off and each version promoted automatically. Sizes in GB (10^9 bytes)."),
              "nights": nights, "verdicts": verdicts(nights)}
    write_results("retention_quick" if args.quick else "retention", report, markdown(report), args.output_dir)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Retention policy and `perennial gc` (tasks/gc.py) against real SeaweedFS, MLflow and a Prefect test harness.

One real micro retrain (the tiny model, three CIT tasks with mid-stage checkpoints and replay) gives a
lineage as a nightly leaves it; runs the retrain never leaves behind on its own (unfinished, continuing,
failed half way through a sweep) are laid out in S3 and MLflow directly, as their processes would have.
"""

import os
import uuid
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from flows.continual_retrain import continual_retrain
from perennial.config import ConfigError, build_config, load_config
from perennial.storage import MANIFEST_NAME, ObjectStore
from perennial.tracking import LINEAGE_TAG, RUN_KEY_TAG
from tasks.gc import GcPlan, _size, cache_entries, collect_garbage, format_plan, plan_gc, sweep
from tasks.runtime import RUN_RECORD, Services, fetch_dir, run_prefix
from tests.test_pipeline import micro_config

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("single_torch_thread")]


def _config(services, tmp_path, *overrides):
    name = f"gc-{uuid.uuid4().hex[:8]}"
    base = micro_config(services, tmp_path).model_dump(mode="json")
    return build_config(base, [f"storage.bucket={name}", f"tracking.registered_model={name}", "tracking.experiment=gc-test",
                               "registry.samples.enabled=false", "eval.max_task_records=4", *overrides])


@pytest.fixture(scope="module")
def retrained(services, prefect_harness, tmp_path_factory):
    """One finished retrain under the default policy: version 1 (challenger), three CIT stages."""
    cfg = _config(services, tmp_path_factory.mktemp("gc"))
    summary = continual_retrain(config=cfg.model_dump(mode="json"))
    return cfg, summary


def _keys(store: ObjectStore, prefix: str) -> set[str]:
    return {info.key for info in store.list(prefix)}


def _prefix(store: ObjectStore, uri: str) -> str:
    return uri.removeprefix(f"s3://{store.bucket}/")


def _bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _with(cfg, *overrides):
    return build_config(cfg.model_dump(mode="json"), list(overrides))


def test_a_policy_that_would_delete_what_a_kept_version_needs_is_refused_at_load(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"retention": {"keep_aliases": ["champion", "challenger"]}}))
    with pytest.raises(ConfigError, match=r"retention\.keep_aliases .* leaves out \['previous-champion'\].*rollback"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"lineage\.continue_from=models:/m@prod .* retention\.keep_aliases"):
        build_config({}, ["lineage.continue_from=models:/m@prod"])
    assert build_config({}, ["lineage.continue_from=models:/m@prod",
                             "retention.keep_aliases=[champion, challenger, previous-champion, prod]"]).retention.keep_aliases[-1] == "prod"
    with pytest.raises(ConfigError, match=r"retention\.keep_last_versions"):
        build_config({}, ["retention.keep_last_versions=-1"])
    from app.cli import main

    assert main(["gc", str(path), "--dry-run"]) == 2  # refused before anything is read or deleted
    assert "retention.keep_aliases" in capsys.readouterr().err
    # the policy says what is deleted, not what is computed: the same run key resumes under another policy
    assert build_config({}, ["retention.min_age_hours=0"]).outputs_digest() == build_config({}).outputs_digest()


def test_the_retrains_own_gc_stage_keeps_everything_younger_than_min_age(retrained, services):
    cfg, summary = retrained
    assert summary["registered_model"]["version"] == 1
    assert summary["gc"] == {"deleted": 0, "bytes": 0}  # everything is minutes old: min_age_hours (24) keeps it
    store = Services.open(cfg).store
    assert any("/checkpoints/step-00000004/" in key for key in _keys(store, run_prefix(cfg, summary["run_key"])))


def test_dry_run_lists_sizes_and_reasons_and_deletes_nothing(retrained, services, tmp_path, capsys):
    cfg, summary = retrained
    cfg = _with(cfg, "retention.min_age_hours=0")
    store = Services.open(cfg).store
    before = {info.key: info.etag for info in store.list(cfg.storage.prefix + "/")}
    work = sorted(p.relative_to(cfg.work_dir) for p in Path(cfg.work_dir).rglob("*"))

    from app.cli import main

    config_file = tmp_path / "gc.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main(["gc", str(config_file), "--dry-run", "--json", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    plan = GcPlan.model_validate_json((tmp_path / "plan.json").read_text())

    assert {info.key: info.etag for info in store.list(cfg.storage.prefix + "/")} == before  # nothing deleted
    assert sorted(p.relative_to(cfg.work_dir) for p in Path(cfg.work_dir).rglob("*")) == work
    assert out.startswith(f"gc {cfg.tracking.registered_model}: would delete {len(plan.deletions)} items")
    paths = {item.path for item in plan.deletions}
    run = run_prefix(cfg, summary["run_key"])
    # every mid-stage checkpoint, the two intermediate stage outputs and their replay buffers, with sizes and reasons
    for stage in ("cit-01-arithmetic", "cit-02-fact_lookup", "cit-03-reverse"):
        assert f"{run}/stages/{stage}/checkpoints/step-00000004" in paths
    assert {f"{run}/stages/cit-01-arithmetic/model", f"{run}/stages/cit-02-fact_lookup/model",
            f"{run}/replay/after-01", f"{run}/replay/after-02"} <= paths
    for item in plan.deletions:
        assert item.bytes > 0 and item.reason and f"{item.path if item.where == 'local' else item.path}" in out
    reasons = {item.path: item.reason for item in plan.deletions}
    assert "whose output is committed" in reasons[f"{run}/stages/cit-01-arithmetic/checkpoints/step-00000004"]
    assert "no kept version references it" in reasons[f"{run}/stages/cit-01-arithmetic/model"]
    # a checkpoint's weights are pieces stored by content: the line names what its manifest lists beside its own files
    model = next(item for item in plan.deletions if item.path == f"{run}/stages/cit-01-arithmetic/model")
    # the tiny model's stage trained every weight: its pieces are its own; the header piece is shared with nothing
    assert model.pieces_bytes > model.bytes and f"files, and {_size(model.pieces_bytes)} of tensor pieces only it lists" in out
    # what version 1 needs is not listed: its checkpoint, replay buffer and lineage record
    version = MlflowClient(cfg.tracking.tracking_uri).get_model_version(cfg.tracking.registered_model, "1")
    for tag in ("checkpoint_uri", "replay_uri", "lineage_uri"):
        assert _prefix(store, version.tags[tag]) not in paths
    assert plan.kept_versions == {"1": "holds alias challenger"}
    assert "kept versions: 1 (holds alias challenger)" in out


def test_gc_never_deletes_what_a_version_references_and_deletes_the_rest(retrained, services):
    """A person registers version 2 on an intermediate checkpoint (cit-01's); gc must keep it while the
    version is kept, delete the other intermediates, then let version 1's checkpoint go once it is kept no more."""
    cfg, summary = retrained
    cfg = _with(cfg, "retention.min_age_hours=0", "retention.keep_last_versions=1", "retention.local_cache_max_gb=0.000001")
    client = MlflowClient(cfg.tracking.tracking_uri)
    name = cfg.tracking.registered_model
    store = Services.open(cfg).store
    run = run_prefix(cfg, summary["run_key"])
    v1 = client.get_model_version(name, "1")
    intermediate = store.uri(f"{run}/stages/cit-01-arithmetic/model")
    v2 = client.create_model_version(name, v1.source, run_id=v1.run_id, tags={"checkpoint_uri": intermediate})
    assert v2.version == "2"
    assert Path(cfg.work_dir, summary["run_key"]).is_dir() and cache_entries(Path(cfg.work_dir) / "cache")

    plan = collect_garbage(cfg)

    assert plan.kept_versions == {"1": "holds alias challenger", "2": "one of the last 1 versions"}
    # Checkpoint tensors are stored by content: the pieces only deleted checkpoints used went with them,
    # and every piece a remaining manifest lists is still there.
    assert [item for item in plan.deletions if item.keys and "no committed directory references" in item.reason]
    referenced = {digest for info in store.list("") if info.key.endswith("/" + MANIFEST_NAME)
                  for entry in store.get_json(info.key)["files"].values() for digest, _ in entry.get("pieces", ())}
    assert referenced and {info.key.rsplit("/", 1)[1] for info in store.list(store.blob_key(""))} == referenced
    for uri in (intermediate, v1.tags["checkpoint_uri"], v1.tags["replay_uri"], v1.tags["lineage_uri"]):
        store.download_dir(_prefix(store, uri), Path(cfg.work_dir).parent / "verify" / uuid.uuid4().hex)  # committed, sha256 verifies
    left = _keys(store, run + "/")
    assert not [key for key in left if "/checkpoints/" in key]  # every mid-stage checkpoint went
    assert not [key for key in left if "/stages/cit-02-fact_lookup/" in key or "/replay/after-0" in key and "after-03" not in key]
    base_and_dap = _keys(store, f"{cfg.storage.prefix}/base-models/") | _keys(store, f"{cfg.storage.prefix}/dap-models/")
    assert not [key for key in base_and_dap if "/checkpoints/" in key]
    assert [key for key in base_and_dap if key.endswith("/model/" + MANIFEST_NAME)]  # the shared models stay
    assert [key for key in _keys(store, f"{cfg.storage.prefix}/datasets/") if key.endswith(MANIFEST_NAME)]  # data stays
    # local: the finished run's work directory went, the download cache is within its bound
    assert not Path(cfg.work_dir, summary["run_key"]).exists()
    assert _bytes(Path(cfg.work_dir) / "cache") <= 1100
    assert fetch_dir(store, v1.tags["checkpoint_uri"], Path(cfg.work_dir) / "cache").joinpath("config.json").is_file()  # downloads again

    # version 1 loses its alias and is not among the last 1 versions: its checkpoint and replay buffer may go now
    client.delete_registered_model_alias(name, "challenger")
    plan = collect_garbage(cfg)
    assert {item.path for item in plan.deletions} >= {_prefix(store, v1.tags["checkpoint_uri"]), _prefix(store, v1.tags["replay_uri"])}
    assert store.read_manifest(_prefix(store, v1.tags["checkpoint_uri"])) is None
    assert "by gc: checkpoint of version 1" in client.get_model_version(name, "1").tags["perennial.checkpoint_deleted"]
    store.download_dir(_prefix(store, intermediate), Path(cfg.work_dir).parent / "verify" / "v2")  # version 2's stays
    assert collect_garbage(cfg).deletions == []  # nothing more to do


# --- runs laid out as their processes leave them ----------------------------------------------------------


def _folder(store: ObjectStore, tmp_path: Path, prefix: str, size: int = 2048, commit: bool = True) -> str:
    local = tmp_path / uuid.uuid4().hex
    local.mkdir()
    (local / "weights.bin").write_bytes(os.urandom(size))  # distinct folders have distinct digests
    if commit:
        return store.upload_dir(local, prefix)["uri"]
    store.put_file(local / "weights.bin", f"{prefix}/weights.bin")
    return store.uri(prefix)


def _registered_lineage(cfg):
    """(services, its store with the bucket made, the MLflow client, the registered model's name, created)."""
    services_ = Services.open(cfg)
    services_.store.ensure_bucket()
    services_.tracker.client.create_registered_model(cfg.tracking.registered_model)
    return services_, services_.store, services_.tracker.client, cfg.tracking.registered_model


def _run(cfg, client: MlflowClient, key: str, status: str, inputs: dict | None = None, error: str | None = None,
         registered: str | None = None) -> str:
    """A parent run in MLflow and its record in S3, as tasks/runtime.py:open_run writes them."""
    experiment = client.get_experiment_by_name(cfg.tracking.experiment) or client.get_experiment(
        client.create_experiment(cfg.tracking.experiment))
    tags = {RUN_KEY_TAG: key, LINEAGE_TAG: cfg.tracking.registered_model, **({"perennial.error": error} if error else {}),
            **({"perennial.registered_version": f"{cfg.tracking.registered_model}/{registered}"} if registered else {})}
    run = client.create_run(experiment.experiment_id, tags=tags)
    if status != "RUNNING":
        client.set_terminated(run.info.run_id, status=status)
    store = Services.open(cfg).store
    store.put_json(f"{run_prefix(cfg, key)}/{RUN_RECORD}", {"run_key": key, "mlflow_run_id": run.info.run_id,
                                                           **({"inputs": inputs} if inputs else {})})
    return run.info.run_id


def test_an_unfinished_run_keeps_what_it_resumes_from_and_the_checkpoint_it_continues(services, tmp_path):
    cfg = _config(services, tmp_path, "retention.min_age_hours=0", "retention.keep_last_versions=0")
    services_ = Services.open(cfg)
    store, client = services_.store, services_.tracker.client
    store.ensure_bucket()
    # a finished run whose final model no version keeps any more (its version 7 was deleted) ...
    _run(cfg, client, "night-1", "FINISHED", registered="7")
    old = run_prefix(cfg, "night-1")
    continued = _folder(store, tmp_path, f"{old}/stages/cit-01-a/model")
    _folder(store, tmp_path, f"{old}/stages/cit-00-x/model")
    # ... which a killed retrain continues: it committed cit-02's output and was killed mid cit-03
    night = run_prefix(cfg, "night-2")
    digest = store.read_manifest(_prefix(store, continued))["digest"]
    _run(cfg, client, "night-2", "KILLED", inputs={"continued checkpoint": digest})
    _folder(store, tmp_path, f"{night}/stages/cit-02-b/model")
    _folder(store, tmp_path, f"{night}/stages/cit-02-b/checkpoints/step-00000004")
    _folder(store, tmp_path, f"{night}/replay/after-02")
    for step in (2, 4):
        _folder(store, tmp_path, f"{night}/stages/cit-03-c/checkpoints/step-{step:08d}")
    _folder(store, tmp_path, f"{night}/stages/cit-03-c/checkpoints/step-00000006", commit=False)  # killed mid-upload

    plan = plan_gc(cfg, services_, dry_run=True)
    reasons = {item.path: item.reason for item in plan.deletions}
    assert set(reasons) == {
        f"{night}/stages/cit-02-b/checkpoints/step-00000004",  # its stage's output is committed
        f"{night}/stages/cit-03-c/checkpoints/step-00000002",  # older than the newest committed one
        f"{night}/stages/cit-03-c/checkpoints/step-00000006",  # never committed
        f"{old}/stages/cit-00-x/model",  # an ended run's intermediate output nothing needs
    }, format_plan(plan)
    assert "older than step-00000004" in reasons[f"{night}/stages/cit-03-c/checkpoints/step-00000002"]
    assert plan.runs["night-2"].startswith("unfinished (killed)")
    sweep(plan, cfg, services_)
    assert store.read_manifest(f"{night}/stages/cit-03-c/checkpoints/step-00000004") is not None  # what a resume reads
    assert store.read_manifest(f"{night}/stages/cit-02-b/model") is not None
    assert store.read_manifest(f"{night}/replay/after-02") is not None
    assert store.read_manifest(_prefix(store, continued)) is not None  # the checkpoint it continues

    # the same run failed for good (an error its rerun repeats): what it would have resumed from may go
    _run(cfg, client, "night-2", "FAILED", error="NonFiniteLossError: cit-03-c: non-finite training loss nan")
    plan = plan_gc(cfg, services_, dry_run=True)
    assert plan.runs["night-2"].startswith("failed for good")
    assert {f"{night}/stages/cit-03-c/checkpoints/step-00000004", f"{night}/stages/cit-02-b/model",
            f"{night}/replay/after-02", _prefix(store, continued)} <= {item.path for item in plan.deletions}


def test_a_sweep_killed_half_way_loses_nothing_needed_and_a_rerun_finishes_it(services, tmp_path, monkeypatch):
    cfg = _config(services, tmp_path, "retention.min_age_hours=0", "retention.keep_last_versions=0")
    services_ = Services.open(cfg)
    store, client = services_.store, services_.tracker.client
    store.ensure_bucket()
    _run(cfg, client, "night-1", "FINISHED")
    root = run_prefix(cfg, "night-1")
    doomed = [_folder(store, tmp_path, f"{root}/stages/cit-0{i}-t/model") for i in (1, 2, 3)]
    kept = _folder(store, tmp_path, f"{root}/stages/cit-04-t/model")
    name = cfg.tracking.registered_model
    client.create_registered_model(name)
    client.create_model_version(name, "s3://elsewhere/model", tags={"checkpoint_uri": kept})
    client.set_registered_model_alias(name, "champion", "1")

    calls = {"n": 0}
    real = ObjectStore.delete_prefix

    def killed_on_second(self, prefix):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed mid-sweep")  # after the second folder's manifest went
        return real(self, prefix)

    monkeypatch.setattr(ObjectStore, "delete_prefix", killed_on_second)
    with pytest.raises(KeyboardInterrupt):
        sweep(plan_gc(cfg, services_), cfg, services_)
    monkeypatch.undo()
    store.download_dir(_prefix(store, kept), tmp_path / "champion")  # the champion's checkpoint is whole
    half = [uri for uri in doomed if store.read_manifest(_prefix(store, uri)) is None and _keys(store, _prefix(store, uri) + "/")]
    assert len(half) == 1  # uncommitted: nothing reads it as a checkpoint

    plan = collect_garbage(cfg)  # the rerun
    assert {item.path for item in plan.deletions} == {_prefix(store, uri) for uri in doomed[1:]}
    assert all(not _keys(store, _prefix(store, uri) + "/") for uri in doomed)
    assert collect_garbage(cfg).deletions == []


def test_a_piece_that_a_folder_committed_after_the_plan_shares_is_not_swept(services, tmp_path):
    import torch
    from safetensors.torch import save_file

    cfg = _config(services, tmp_path, "retention.min_age_hours=0", "retention.keep_last_versions=0")
    services_ = Services.open(cfg)
    store = services_.store
    store.ensure_bucket()
    _run(cfg, services_.tracker.client, "night-1", "FINISHED")
    local = tmp_path / "checkpoint"
    local.mkdir()
    save_file({"w": torch.randn(256, 256)}, str(local / "model.safetensors"))
    intermediate = f"{run_prefix(cfg, 'night-1')}/stages/cit-01-t/model"
    store.upload_dir(local, intermediate)
    _folder(store, tmp_path, f"{run_prefix(cfg, 'night-1')}/stages/cit-02-t/model")  # the run's last stage: its product
    plan = plan_gc(cfg, services_)
    pieces = [item for item in plan.deletions if item.keys]
    assert pieces and {item.path for item in plan.deletions} >= {intermediate}

    other = "another-lineage/stages/cit-01-t/model"  # the same tensor, committed between plan and sweep
    store.upload_dir(local, other)
    sweep(plan, cfg, services_)
    assert store.read_manifest(intermediate) is None
    store.download_dir(other, tmp_path / "other")  # whole: its pieces were read again before the sweep
    assert (tmp_path / "other" / "model.safetensors").read_bytes() == (local / "model.safetensors").read_bytes()


def test_the_mlflow_model_of_a_version_no_longer_kept_goes_and_a_kept_or_shared_one_stays(services, tmp_path, capsys):
    cfg = _config(services, tmp_path, "retention.min_age_hours=0", "retention.keep_last_versions=1")
    services_, store, client, name = _registered_lineage(cfg)
    sources = {}
    for night in (1, 2, 3):  # each retrain logs its model to its parent run, as tasks/register.py does
        run_id = _run(cfg, client, f"night-{night}", "FINISHED", registered=str(night))
        folder = tmp_path / f"model-{night}"
        folder.mkdir()
        (folder / "MLmodel").write_text("flavors: {}\n")
        (folder / "model.safetensors").write_bytes(os.urandom(4096))
        client.log_artifacts(run_id, str(folder), "model")
        sources[night] = f"{client.get_run(run_id).info.artifact_uri}/model"
    for version, night in ((1, 1), (2, 2), (3, 1), (4, 3)):  # version 3 shares version 1's files
        client.create_model_version(name, sources[night], run_id=_run_of(sources[night]), tags={"checkpoint_uri": f"s3://elsewhere/{version}"})
    client.set_registered_model_alias(name, "champion", "3")

    assert not [i for i in plan_gc(_with(cfg, "retention.delete_unkept_models=false"), services_).deletions if i.where == "mlflow"]
    from app.cli import main

    config_file = tmp_path / "gc.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main(["gc", str(config_file), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"{sources[2]}  4.0 KiB, 2 files: MLflow model of version 2, which is not kept: models:/{name}/2 stops loading" in out

    plan = collect_garbage(cfg)
    assert [(i.version, i.path) for i in plan.deletions if i.where == "mlflow"] == [("2", sources[2])]
    assert "by gc: MLflow model of version 2" in client.get_model_version(name, "2").tags["perennial.model_deleted"]
    assert not client.list_artifacts(_run_of(sources[2]), "model")
    for version in ("1", "3", "4"):  # version 1 is not kept, but version 3 (champion) loads the same files
        assert client.list_artifacts(_run_of(client.get_model_version(name, version).source), "model"), version
    assert not [i for i in collect_garbage(cfg).deletions if i.where == "mlflow"]  # done once


def test_a_version_model_stored_by_content_goes_with_its_own_pieces_and_shared_pieces_stay(services, tmp_path, capsys):
    """registry.model_files: checkpoint (perennial/model_files.py): a version's MLflow model is a folder of the lineage's
    bucket whose weights are pieces other folders share. gc deletes an unkept version's folder and, in the same sweep,
    the pieces only it listed; the kept version still loads through `models:/`."""
    import mlflow.artifacts
    import torch
    from mlflow.exceptions import MlflowException
    from safetensors.torch import save_file

    from perennial.model_files import model_files_prefix, model_files_uri, registered_folder

    cfg = _config(services, tmp_path, "retention.min_age_hours=0", "retention.keep_last_versions=1")
    services_, store, client, name = _registered_lineage(cfg)
    shared = torch.arange(40_000, dtype=torch.float32)  # 160 KB: a piece of its own, in every version
    for night in (1, 2, 3):
        run_id = _run(cfg, client, f"night-{night}", "FINISHED", registered=str(night))
        folder = tmp_path / f"model-{night}"
        (folder / "model").mkdir(parents=True)
        (folder / "MLmodel").write_text("flavors: {}\n")
        save_file({"embed": shared, "trained": torch.full((40_000,), float(night))}, folder / "model" / "model.safetensors")
        prefix = model_files_prefix(cfg.storage.prefix, name, run_id)
        store.upload_dir(folder, prefix)
        client.create_model_version(name, model_files_uri(store.bucket, prefix), run_id=run_id)
    orphan_run = _run(cfg, client, "night-4", "FINISHED")  # its registration failed after the upload: no version
    save_file({"trained": torch.full((40_000,), 4.0)}, tmp_path / "model-3" / "orphan.safetensors")
    orphan = model_files_prefix(cfg.storage.prefix, name, orphan_run)
    store.upload_dir(tmp_path / "model-3", orphan)
    (tmp_path / "model-3" / "orphan.safetensors").unlink()
    client.set_registered_model_alias(name, "champion", "3")
    piece = lambda version: {d for e in store.read_manifest(registered_folder(client.get_model_version(name, version).source))  # noqa: E731
                             ["files"].values() for d, _ in e.get("pieces", ())}
    own = {version: piece(version) - piece("3") for version in ("1", "2")}
    assert all(len(digests) == 1 for digests in own.values())  # its trained tensor (headers and `embed` are alike)

    from app.cli import main

    config_file = tmp_path / "gc.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main(["gc", str(config_file), "--dry-run"]) == 0
    source_1 = client.get_model_version(name, "1").source
    out = capsys.readouterr().out
    assert f"{store.uri(registered_folder(source_1))}  " in out and "MLflow model of version 1" in out  # its size and why

    plan = collect_garbage(cfg)
    assert sorted(str(i.version) for i in plan.deletions if i.where == "mlflow") == ["1", "2", "None"]
    assert store.read_manifest(orphan) is None  # the orphan folder went too
    blobs = {key.rsplit("/", 1)[1] for key in _keys(store, store.blob_key(""))}
    assert not (own["1"] | own["2"]) & blobs and piece("3") <= blobs  # in the same sweep; the champion's all stay
    with pytest.raises(MlflowException, match="perennial gc"):
        mlflow.artifacts.download_artifacts(f"models:/{name}/1", dst_path=str(tmp_path / "v1"))
    loaded = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@champion", dst_path=str(tmp_path / "v3")))
    assert (loaded / "model" / "model.safetensors").read_bytes() == (tmp_path / "model-3" / "model" / "model.safetensors").read_bytes()
    # the version's source URI itself loads too: MLflow roots that repository at the model, one folder per run
    direct = Path(mlflow.artifacts.download_artifacts(client.get_model_version(name, "3").source, dst_path=str(tmp_path / "d3")))
    assert (direct / "model" / "model.safetensors").read_bytes() == (loaded / "model" / "model.safetensors").read_bytes()
    assert "by gc: MLflow model of version 1" in client.get_model_version(name, "1").tags["perennial.model_deleted"]


def test_a_dap_model_goes_once_no_run_may_resume_from_it_and_no_kept_version_came_from_it(services, tmp_path):
    """DAP models are shared by content digest: one goes only when every run of this lineage that trained from it
    ended and none of their versions is kept; one no run of this lineage used (another lineage's) stays."""
    from tasks.dap import DAP_MODEL_TAG

    cfg = _config(services, tmp_path, "retention.min_age_hours=0", "retention.keep_last_versions=1",
                  "retention.delete_unkept_models=false")  # the versions' sources are nowhere: not this test's subject
    services_, store, client, name = _registered_lineage(cfg)
    dap = {k: f"{cfg.storage.prefix}/dap-models/{k}" for k in ("old", "kept", "resuming", "other")}
    for prefix in dap.values():
        _folder(store, tmp_path, prefix + "/model")
    for key, status, model, version in (("night-1", "FINISHED", "old", "1"), ("night-2", "FINISHED", "kept", "2"),
                                        ("night-3", "KILLED", "resuming", None)):
        run_id = _run(cfg, client, key, status, registered=version)
        client.set_tag(run_id, DAP_MODEL_TAG, store.uri(dap[model] + "/model"))
        if version:
            client.create_model_version(name, f"s3://elsewhere/{version}", run_id=run_id)

    plan = plan_gc(cfg, services_)
    going = {item.path: item.reason for item in plan.deletions}
    assert dap["old"] + "/model" in going and "DAP model of 1 ended run" in going[dap["old"] + "/model"]
    assert not {dap[k] + "/model" for k in ("kept", "resuming", "other")} & set(going)
    sweep(plan, cfg, services_)
    assert store.read_manifest(dap["old"] + "/model") is None
    assert all(store.read_manifest(dap[k] + "/model") for k in ("kept", "resuming", "other"))


def _run_of(source: str) -> str:
    """The run id in a run's artifact URI (mlflow-artifacts:/EXPERIMENT/RUN/artifacts/model)."""
    return source.split("/artifacts/")[0].rsplit("/", 1)[1]


def test_gc_waits_for_a_retrain_holding_the_lineage_lock(services, prefect_harness, tmp_path):
    """A sweep never runs beside a retrain of its lineage: it waits for the lineage lock the retrain holds."""
    import threading
    import time

    from flows.gc import gc
    from perennial.locks import lineage_lock

    cfg = _config(services, tmp_path)
    Services.open(cfg).store.ensure_bucket()
    held = threading.Event()
    released = {}

    def retrain():
        with lineage_lock(cfg.tracking.registered_model):
            held.set()
            time.sleep(4)
            released["at"] = time.monotonic()

    holder = threading.Thread(target=retrain)
    holder.start()
    held.wait(60)
    result = gc(config=cfg.model_dump(mode="json"))
    finished = time.monotonic()
    holder.join()
    assert finished >= released["at"] and result["deletions"] == []


def test_the_plan_says_why_what_waits_is_kept_and_how_many_pieces_of_the_bucket_go():
    from tasks.gc import Deletion

    plan = GcPlan(lineage="m", dry_run=True, min_age_hours=24, waiting=["s3://b/runs/m/k/stages/cit-01-t/model (3.4 MiB): ..."],
                  deletions=[Deletion(where="s3", path="p/blobs/sha256", bytes=2048, objects=2, keys=["a", "b"],
                                      reason="2 of the bucket's 5 checkpoint pieces ...")])
    text = format_plan(plan)
    assert "kept for now (1; unless the line says what it waits for, it was written or used within " \
           "retention.min_age_hours=24 and goes for the reason given once older):" in text
    assert "2.0 KiB, 2 files: 2 of the bucket's 5 checkpoint pieces" in text


def test_reclaim_disk_returns_the_bytes_of_deleted_objects_to_the_disk(services, store):
    """SeaweedFS only marks a deleted object; `perennial gc` then compacts the local volumes (`reclaim_disk`), so the
    disk gets back what gc reports deleted, not half an hour later or never (volumes under 30% garbage)."""
    store.put_bytes("big/blob", os.urandom(48 << 20))
    written = services.volume_bytes()
    assert store.delete_prefix("big/") == 1
    assert services.reclaim_disk() > 32 << 20
    assert services.volume_bytes() < written - (32 << 20), (written, services.volume_bytes())

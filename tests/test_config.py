import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from perennial.config import Config, ConfigError, build_config, load_config, parse_overrides


def test_demo_config_loads_and_overrides_apply():
    cfg = load_config("configs/tiny.yaml", ["cit.optim.lr=3e-4", "cit.tuning.method=attn-proj", "data.demo.tasks=[arithmetic]"])
    assert cfg.cit.optim.lr == pytest.approx(3e-4)
    assert cfg.cit.tuning.method == "attn-proj"
    assert cfg.data.demo.tasks == ["arithmetic"]


def test_digest_is_stable_and_sensitive():
    a = load_config("configs/tiny.yaml")
    b = load_config("configs/tiny.yaml")
    c = load_config("configs/tiny.yaml", ["seed=1"])
    assert a.digest() == b.digest() != c.digest()


@pytest.mark.parametrize(
    "override, key",
    [
        ("cit.optim.lr=-1", "cit.optim.lr"),
        ("cit.replay.budget=1.5", "cit.replay.budget"),
        ("cit.optmi.lr=1", "cit.optmi"),
        ("model.tiny.hidden_size=abc", "model.tiny.hidden_size"),
        ("cit.tuning.method=everything", "cit.tuning.method"),
    ],
)
def test_bad_values_are_rejected_naming_the_key(override, key):
    with pytest.raises(ConfigError) as error:
        load_config("configs/tiny.yaml", [override])
    assert key in str(error.value)


def test_unknown_key_message_says_unknown():
    with pytest.raises(ConfigError, match="unknown key"):
        build_config({"sede": 1})


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["cit.optim.lr"])
    with pytest.raises(ConfigError, match="empty key"):
        parse_overrides(["cit..lr=1"])


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_regex_method_requires_patterns():
    with pytest.raises(ConfigError, match="trainable_regex"):
        build_config({"cit": {"tuning": {"method": "regex"}}})


@settings(max_examples=60, deadline=None)
@given(lr=st.floats(allow_nan=True, allow_infinity=True), budget=st.floats(allow_nan=True, allow_infinity=True))
def test_validators_accept_exactly_the_allowed_ranges(lr, budget):
    lr_ok = 0 < lr <= 1.0
    finite = budget == budget and abs(budget) != float("inf")
    budget_ok = finite and budget > 0 and (budget <= 1 or budget == int(budget))
    try:
        cfg = build_config({"cit": {"optim": {"lr": lr}, "replay": {"budget": budget}}})
    except ConfigError:
        assert not (lr_ok and budget_ok)
    else:
        assert lr_ok and budget_ok
        assert isinstance(cfg, Config)


def test_env_references_resolve_with_defaults(monkeypatch, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("storage:\n  endpoint_url: ${PERENNIAL_TEST_S3:-http://127.0.0.1:1}\n  bucket: ${PERENNIAL_TEST_BUCKET}\n")
    monkeypatch.setenv("PERENNIAL_TEST_BUCKET", "from-env")
    cfg = load_config(path)
    assert (cfg.storage.endpoint_url, cfg.storage.bucket) == ("http://127.0.0.1:1", "from-env")
    monkeypatch.delenv("PERENNIAL_TEST_BUCKET")
    with pytest.raises(ConfigError, match="PERENNIAL_TEST_BUCKET"):
        load_config(path)


def test_heldout_general_tasks_are_validated():
    cfg = load_config("configs/tiny.yaml", ["data.demo.heldout_tasks=[uppercase]"])
    assert cfg.data.demo.heldout_tasks == ["uppercase"]
    with pytest.raises(ConfigError, match="heldout_tasks"):
        load_config("configs/tiny.yaml", ["data.demo.heldout_tasks=[reverse]"])  # reverse is trained in demo.yaml
    source = [{"uri": "x.jsonl"}]
    heldout = {"name": "probe", "shape": "alpaca", "role": "heldout", "sources": source}
    cfg = build_config({"data": {"source": "datasets", "datasets": [heldout]}})
    assert cfg.data.datasets[0].resolved_role == "heldout"
    with pytest.raises(ConfigError, match="heldout"):
        build_config({"data": {"source": "datasets", "datasets": [{**heldout, "shape": "text"}]}})


def test_multi_process_stages_are_validated_before_any_work():
    cfg = load_config("configs/tiny.yaml", ["distributed.nproc_per_node=4", "distributed.strategy=fsdp"])
    assert (cfg.distributed.nproc_per_node, cfg.distributed.strategy) == (4, "fsdp")
    assert load_config("configs/tiny.yaml").distributed.nproc_per_node == 1
    with pytest.raises(ConfigError, match=r"dap.optim.batch_size 16 must be divisible by distributed.nproc_per_node 3"):
        load_config("configs/tiny.yaml", ["distributed.nproc_per_node=3"])
    with pytest.raises(ConfigError, match=r"cit.optim.batch_size 6 must be divisible"):
        load_config("configs/tiny.yaml", ["distributed.nproc_per_node=4", "cit.optim.batch_size=6"])
    with pytest.raises(ConfigError, match=r"model.pretrain.batch_size 16 must be divisible by distributed.nproc_per_node 3"):
        load_config("configs/tiny.yaml", ["distributed.nproc_per_node=3", "dap.optim.batch_size=6", "cit.optim.batch_size=6"])


# docs/methods.md, "Several processes": every method runs under DDP and under FSDP2 (issue #48;
# tests/test_cl_fsdp.py trains each under FSDP2 against one process).
@pytest.mark.parametrize("method", ["ewc", "lwf", "averaging", "seekr", "olora", "merge"])
def test_plugin_methods_are_accepted_under_ddp_and_fsdp(method):
    for strategy in ("ddp", "fsdp"):
        cfg = load_config("configs/tiny.yaml", ["distributed.nproc_per_node=2", f"distributed.strategy={strategy}",
                                                f"cit.methods=[{{name: {method}}}]"])
        assert [m.name for m in cfg.cit.methods] == [method] and cfg.distributed.strategy == strategy


def test_replay_runs_under_fsdp():
    cfg = load_config("configs/tiny.yaml", ["distributed.nproc_per_node=2", "distributed.strategy=fsdp", "cit.replay.enabled=true"])
    assert cfg.cit.replay.enabled and not cfg.cit.methods
    with pytest.raises(ConfigError, match="distributed.strategy"):
        load_config("configs/tiny.yaml", ["distributed.strategy=zero3"])


def test_option_scoring_of_shapes_without_options_is_refused_at_config_time():
    with pytest.raises(ConfigError, match=r"eval.scoring='options' needs test records with options, and the demo tasks have none"):
        load_config("configs/tiny.yaml", ["eval.scoring=options"])
    source = [{"uri": "x.jsonl"}]
    datasets = [
        {"name": "general", "shape": "text", "role": "general", "sources": source},
        {"name": "chat", "shape": "chat", "sources": source},
        {"name": "probe", "shape": "alpaca", "role": "heldout", "sources": source},
        {"name": "topics", "shape": "classification", "labels": ["a", "b"], "instruction": "Topic?", "sources": source},
    ]
    with pytest.raises(ConfigError, match=r"datasets \['chat', 'probe'\] have shape alpaca or chat"):
        build_config({"data": {"source": "datasets", "datasets": datasets}, "eval": {"scoring": "options"}})
    # classification records always have options; instruction records may (checked after ingest)
    instruction = {"name": "inst", "shape": "instruction", "sources": source}
    cfg = build_config({"data": {"source": "datasets", "datasets": [datasets[0], datasets[3], instruction]}, "eval": {"scoring": "options"}})
    assert cfg.eval.scoring == "options"


def test_integer_labels_is_a_classification_key():
    source = [{"uri": "x.jsonl"}]
    topics = {"name": "t", "shape": "classification", "labels": ["1", "2"], "instruction": "Stars?", "sources": source}
    assert build_config({"data": {"datasets": [{**topics, "integer_labels": "indexes"}]}}).data.datasets[0].integer_labels == "indexes"
    with pytest.raises(ConfigError, match="integer_labels applies to shape 'classification' only"):
        build_config({"data": {"datasets": [{"name": "a", "shape": "alpaca", "sources": source, "integer_labels": "names"}]}})
    with pytest.raises(ConfigError, match="integer_labels"):
        build_config({"data": {"datasets": [{**topics, "integer_labels": "numbers"}]}})


def test_a_gate_or_registry_change_keeps_the_outputs_digest_so_run_keys_resume():
    """Issue #37: the registry's settings judge a version, they do not change what is trained, so changing a
    gate neither orphans published runs nor refuses a resume; what is trained still does."""
    from perennial.config import build_config

    base = build_config({})
    judged_otherwise = build_config({}, ["registry.gates.max_output_drift_kl=3", "registry.auto_promote=true",
                                         "registry.gates.max_general_task_drop=null", "lineage.retrain_after_records=500"])
    assert judged_otherwise.outputs_digest() == base.outputs_digest() != judged_otherwise.digest()
    assert build_config({}, ["cit.optim.lr=0.5"]).outputs_digest() != base.outputs_digest()
    assert build_config({}, ["lineage.continue_from=champion"]).outputs_digest() != base.outputs_digest()


def test_a_check_across_keys_names_them_without_echoing_the_whole_config():
    from perennial.config import ConfigError, build_config

    with pytest.raises(ConfigError) as refused:
        build_config({}, ["distributed.strategy=fsdp", "distributed.nproc_per_node=3"])
    text = str(refused.value)
    assert "dap.optim.batch_size 16 must be divisible by distributed.nproc_per_node 3" in text
    assert "(got {" not in text and len(text) < 600  # before: the whole config, ~1.7 KB, after the message


@pytest.mark.parametrize("setting", ["fused_adamw", "compile"])
def test_numerics_opt_ins_are_part_of_a_runs_identity_only_when_on(setting):
    """`optim.fused_adamw` and `optim.compile` change the weights in the last bits, so switched on each changes the
    outputs digest and the base-model and DAP keys; left off it is not written at all, so every digest is what it
    was before it existed."""
    from types import SimpleNamespace

    from perennial.config import OptimConfig
    from tasks.base_model import base_model_key
    from tasks.dap import dap_key
    from tasks.ingest import DatasetRef
    from tasks.runtime import RunContext

    assert setting in OptimConfig.OPT_INS
    assert setting not in OptimConfig().model_dump() and OptimConfig(**{setting: True}).model_dump()[setting] is True
    defaults = Config().model_dump(mode="json")

    def keys(cfg):
        run = RunContext(config=cfg, run_key="k", parent_run_id="p")
        run._services = SimpleNamespace(store=SimpleNamespace(bucket="b", read_manifest=lambda prefix: {"digest": "m"}))
        ref = lambda name: DatasetRef(name=name, kind="text", digest=f"{name}-digest", uri=f"s3://b/{name}", data_file="d")  # noqa: E731
        return (cfg.outputs_digest(), base_model_key(run, ref("general")),
                dap_key(run, "s3://b/base/model", SimpleNamespace(domain=ref("d"), general=ref("g"))))

    base = keys(build_config(defaults))
    assert keys(build_config(defaults, [f"cit.optim.{setting}=false"])) == base
    for section, changed in (("model.pretrain", (True, True, False)), ("dap.optim", (True, False, True)), ("cit.optim", (True, False, False))):
        on = keys(build_config(defaults, [f"{section}.{setting}=true"]))
        assert tuple(a != b for a, b in zip(on, base)) == changed, section

"""Registry commands on their error paths, against the real MLflow server: exit codes and what to do next."""

from __future__ import annotations

import uuid

from mlflow.tracking import MlflowClient

from app.cli import main


def first_champion(client: MlflowClient) -> str:
    name = f"cli-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name)
    client.create_model_version(name, "s3://bucket/runs/r1/model", tags={"checkpoint_uri": "s3://bucket/runs/r1/model"})
    client.set_registered_model_alias(name, "champion", "1")
    return name


def test_review_of_a_missing_model_exits_1_naming_it_and_the_models_there(services, capsys):
    name = first_champion(MlflowClient(services.mlflow_uri))
    capsys.readouterr()  # MLflow's own log lines while the version was created
    assert main(["review", "nosuchmodel", "--tracking-uri", services.mlflow_uri]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"error: no registered model 'nosuchmodel' at {services.mlflow_uri}; registered models: ")
    assert name in captured.err and f"{services.mlflow_uri}/#/models" in captured.err and captured.err.endswith("\n")


def test_review_of_a_model_without_champion_or_challenger_ends_with_a_newline(services, capsys):
    name = f"cli-{uuid.uuid4().hex[:8]}"
    MlflowClient(services.mlflow_uri).create_registered_model(name)
    assert main(["review", name, "--tracking-uri", services.mlflow_uri]) == 0
    out = capsys.readouterr().out
    assert "no champion and no challenger yet" in out and out.endswith(")\n")


def test_rollback_of_a_first_champion_says_how_to_unpromote_and_unpromote_does(services, capsys, monkeypatch):
    client = MlflowClient(services.mlflow_uri)
    name = first_champion(client)
    uri = ["--tracking-uri", services.mlflow_uri]
    capsys.readouterr()
    assert main(["rollback", name, *uri]) == 1
    err = capsys.readouterr().err
    assert f"nothing to roll back to; to withdraw champion v1 and leave no champion, run `perennial unpromote {name} --reason '...'`" in err

    monkeypatch.setenv("USER", "dana")
    assert main(["unpromote", name, "--reason", "bad outputs", *uri]) == 0
    assert capsys.readouterr().out == f"{name}: v1 is no longer the champion; no version is\n"
    assert client.get_registered_model(name).aliases == {}
    tags = client.get_model_version(name, "1").tags
    assert (tags["unpromoted_by"], tags["unpromoted_reason"]) == ("dana", "bad outputs") and tags["unpromoted_at"]
    assert main(["unpromote", name, *uri]) == 1
    assert f"{name} has no champion: nothing to unpromote" in capsys.readouterr().err


def test_unpromote_refuses_when_rollback_can_restore_a_previous_champion(services, capsys):
    client = MlflowClient(services.mlflow_uri)
    name = first_champion(client)
    client.create_model_version(name, "s3://bucket/runs/r2/model")
    assert main(["promote", name, "2", "--tracking-uri", services.mlflow_uri]) == 0
    assert main(["unpromote", name, "--tracking-uri", services.mlflow_uri]) == 1
    assert f"run `perennial rollback {name}`" in capsys.readouterr().err
    assert client.get_model_version_by_alias(name, "champion").version == "2"


def test_commands_against_an_unreachable_tracking_server_say_how_to_start_it(capsys):
    from app.services import free_ports

    (port,) = free_ports(1)
    for command in (["review", "some-model"], ["promote", "some-model", "2"], ["status"]):
        assert main([*command, "--tracking-uri", f"http://127.0.0.1:{port}"]) == 1, command
        err = capsys.readouterr().err
        assert f"MLflow tracking server http://127.0.0.1:{port} is unreachable" in err and "perennial services up" in err, err


def test_without_mlflow_auth_nobody_is_authenticated_and_by_still_names_who(services, capsys):
    """The plain server (`make run`): no auth app, so no identity check; --by is recorded as before."""
    from perennial.tracking import authenticated_user

    assert authenticated_user(services.mlflow_uri) is None
    assert services.status()["mlflow"]["auth"] is False
    client = MlflowClient(services.mlflow_uri)
    name = first_champion(client)
    client.create_model_version(name, "s3://bucket/runs/r2/model")
    assert main(["promote", name, "2", "--by", "erin", "--tracking-uri", services.mlflow_uri]) == 0
    assert client.get_model_version(name, "2").tags["promoted_by"] == "erin"

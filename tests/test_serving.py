"""A registered version served by MLflow's own scoring server (`mlflow models serve`), as a user runs it.

Two tiny models are logged as `register` logs a retrain's (tasks/register.py: save_mlflow_model) to a
real MLflow server, registered with alias `champion`, and each served by a real `mlflow models serve -m
models:/NAME@champion --env-manager local` process: one whose tokenizer has a chat template
(`llm/v1/chat`) and one without (`llm/v1/completions`, prompts in Perennial's default template). Every
served answer must be Perennial's own greedy generation (models/evaluation.py: generate), token for token.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import mlflow.pyfunc
import mlflow.transformers
import pytest
import torch
from mlflow.tracking import MlflowClient
from transformers import GenerationConfig

from models.data import encode_prompt
from models.evaluation import generate
from models.loading import load_model_and_tokenizer, save_model
from tasks.register import CHAT_TASK, COMPLETIONS_TASK, save_mlflow_model
from tests.tiny_models import tiny

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("single_torch_thread")]

MAX_TOKENS = 12
LLAMA_STYLE = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
               "{% if add_generation_prompt %}[assistant] {% endif %}")
SERVER_START_S = 240  # a loaded 2-core machine: mlflow, transformers and torch imported, the model downloaded


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _register(client: MlflowClient, experiment_id: str, name: str, model, tokenizer, tmp: Path) -> Path:
    """Log the model as `register` does (save_mlflow_model, then the run's model/ folder) and make it champion."""
    checkpoint = save_model(model, tokenizer, tmp / name / "checkpoint")
    folder = save_mlflow_model(checkpoint, tmp / name / "mlflow", f"# {name}\n", name=f"models:/{name}")
    run = client.create_run(experiment_id)
    client.log_artifacts(run.info.run_id, str(folder), "model")
    client.set_terminated(run.info.run_id)
    client.create_registered_model(name)
    version = client.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    client.set_registered_model_alias(name, "champion", version.version)
    return checkpoint


def _post(url: str, body) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/invocations", data=body if isinstance(body, bytes) else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        text = error.read()
        try:
            return error.code, json.loads(text)
        except ValueError:
            return error.code, {"message": text.decode(errors="replace")}


def _wait_until_up(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"mlflow models serve exited {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"mlflow models serve did not answer /ping within {SERVER_START_S} s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def served(services, tmp_path_factory):
    """{"chat": ..., "completions": ...}: each a served registered model (url, name, checkpoint)."""
    tmp = tmp_path_factory.mktemp("serving")
    client = MlflowClient(services.mlflow_uri)
    experiment_id = client.create_experiment(f"serving-{uuid.uuid4().hex[:8]}")
    models = {"chat": tiny("llama"), "completions": tiny("qwen2", chat_template=None)}
    # The server runs `uvicorn` by name: the venv's bin first on PATH, as with an activated venv.
    env = {**os.environ, "MLFLOW_TRACKING_URI": services.mlflow_uri, "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    servers, processes = {}, []
    try:
        for kind, (model, tokenizer) in models.items():
            name = f"serve-{kind}-{uuid.uuid4().hex[:8]}"
            checkpoint = _register(client, experiment_id, name, model, tokenizer, tmp)
            port, log = _free_port(), tmp / f"{kind}.log"
            # Both start at once: model download and imports overlap.
            process = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{name}@champion", "--env-manager", "local",
                 "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
            )
            processes.append(process)
            servers[kind] = {"url": f"http://127.0.0.1:{port}", "name": name, "checkpoint": checkpoint, "process": process, "log": log}
        for server in servers.values():
            _wait_until_up(server["url"], server["process"], server["log"])
        yield servers
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, 15)  # its own session: the server and the worker it started
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, 9)


def _perennial_answer(checkpoint: Path, prompt) -> tuple[str, list[int], list[int]]:
    """(Perennial's answer, its prompt ids, its answer ids up to EOS) for greedy decoding of MAX_TOKENS."""
    model, tokenizer = load_model_and_tokenizer(checkpoint)
    [answer] = generate(model, tokenizer, [prompt], max_new_tokens=MAX_TOKENS)
    ids = encode_prompt(tokenizer, prompt)
    config = GenerationConfig(max_new_tokens=MAX_TOKENS, do_sample=False, num_beams=1, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        new = model.generate(torch.tensor([ids]), generation_config=config)[0, len(ids):].tolist()
    assert tokenizer.decode(new[: new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new,
                            skip_special_tokens=True) == answer  # the ids below are those of Perennial's answer
    return answer, ids, new


def test_a_chat_request_gets_perennials_own_answer_in_the_chat_completion_shape(served):
    server = served["chat"]
    messages = [{"role": "system", "content": "Answer in French. Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    # temperature, as OpenAI clients send it, is accepted; decoding stays greedy (the scored answer).
    status, reply = _post(server["url"], {"messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0.7})
    # MLflow's transformers flavor answers a request as a batch of one: a list holding the chat completion.
    assert status == 200 and isinstance(reply, list) and len(reply) == 1, reply
    [reply] = reply
    assert set(reply) == {"id", "object", "created", "model", "choices", "usage"}
    assert reply["object"] == "chat.completion" and reply["model"] == f"models:/{server['name']}"
    [choice] = reply["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"

    answer, prompt_ids, answer_ids = _perennial_answer(server["checkpoint"], messages)
    # Only the answer comes back (no prompt), and it is Perennial's: same prompt tokens (the model's own
    # ChatML template with the system turn, no extra BOS), same answer tokens, same text.
    assert choice["message"]["content"] == answer.lstrip()  # MLflow strips the answer's leading whitespace
    assert reply["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": len(answer_ids),
                              "total_tokens": len(prompt_ids) + len(answer_ids)}
    assert choice["finish_reason"] == ("stop" if len(answer_ids) < MAX_TOKENS else "length")

    # The registered version is logged with the chat task, and still loads with both MLflow loaders.
    loaded = mlflow.pyfunc.load_model(f"models:/{server['name']}@champion")
    assert loaded.metadata.metadata["task"] == CHAT_TASK
    [offline] = loaded.predict({"messages": messages, "max_tokens": MAX_TOKENS})
    assert offline["choices"][0]["message"]["content"] == choice["message"]["content"]
    pipeline = mlflow.transformers.load_model(f"models:/{server['name']}@champion")
    assert pipeline.task == "text-generation" and pipeline.model.generation_config.do_sample is False


def test_a_model_without_a_chat_template_serves_completions_in_perennials_default_template(served):
    server = served["completions"]
    status, reply = _post(server["url"], {"prompt": "What is 2+2?", "max_tokens": MAX_TOKENS, "temperature": 0.0})
    assert status == 200 and isinstance(reply, list) and len(reply) == 1, reply
    [reply] = reply
    assert reply["object"] == "text_completion"
    [choice] = reply["choices"]
    answer, prompt_ids, answer_ids = _perennial_answer(server["checkpoint"], "What is 2+2?")
    # The prompt was wrapped as Perennial renders a template-less model's prompt (BOS, ### Instruction: ...).
    assert reply["usage"]["prompt_tokens"] == len(prompt_ids) and reply["usage"]["completion_tokens"] == len(answer_ids)
    assert choice["text"] == answer.lstrip()
    assert mlflow.pyfunc.load_model(f"models:/{server['name']}@champion").metadata.metadata["task"] == COMPLETIONS_TASK

    # a chat request to it names the field this model takes
    status, error = _post(server["url"], {"messages": [{"role": "user", "content": "hi"}]})
    assert status == 400 and "Model is missing inputs ['prompt']" in error["message"], error


def test_a_malformed_request_gets_a_400_that_says_what_is_wrong(served):
    url = served["chat"]["url"]
    for body, reason in [
        ({"prompt": "What is 2+2?"}, "Model is missing inputs ['messages']"),  # a completions request to the chat model
        ({"messages": [{"content": "no role"}]}, "Missing required properties: {'role'}"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}, "Incompatible input types for column max_tokens"),
        ({"inputs": ["What is 2+2?"]}, "Expected data to be dictionary, got str"),  # the text-generation request of before
        (b"not json", "Ensure that input is a valid JSON formatted string"),
    ]:
        status, error = _post(url, body)
        assert status == 400 and reason in error["message"], (body, status, error)


def test_a_template_that_writes_its_own_bos_gets_no_second_one(tmp_path):
    """A Llama-style tokenizer adds BOS when it tokenizes text and its template writes `{{ bos_token }}`
    too; Perennial encodes the rendered prompt without added tokens, and so must the served model."""
    from tokenizers import processors

    model, tokenizer = tiny("llama", chat_template=LLAMA_STYLE)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tokenizer.bos_token} $A", special_tokens=[(tokenizer.bos_token, tokenizer.bos_token_id)])
    checkpoint = save_model(model, tokenizer, tmp_path / "checkpoint")
    assert load_model_and_tokenizer(checkpoint)[1]("hi").input_ids[0] == tokenizer.bos_token_id  # it adds BOS to text
    folder = save_mlflow_model(checkpoint, tmp_path / "mlflow", "card")
    messages = [{"role": "user", "content": "What is 2+2?"}]
    [reply] = mlflow.pyfunc.load_model(str(folder)).predict({"messages": messages, "max_tokens": MAX_TOKENS})
    answer, prompt_ids, answer_ids = _perennial_answer(checkpoint, messages)
    assert prompt_ids.count(tokenizer.bos_token_id) == 1
    assert reply["usage"]["prompt_tokens"] == len(prompt_ids) and reply["usage"]["completion_tokens"] == len(answer_ids)
    assert reply["choices"][0]["message"]["content"] == answer.lstrip()

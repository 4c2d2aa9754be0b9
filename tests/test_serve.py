"""`openllama serve`: OpenAI's completions API on Ray Serve, checked with real clients (the `openai` package, lm-eval's
`local-completions` model, plain HTTP) against what the in-process code computes.

One application for the module: `openllama serve CKPT --detach` on the session's Ray head, with an API key, on a
tiny model; `openllama serve --stop` ends it. The foreground command (its one line, SIGTERM) runs once on an
in-process Ray of its own.
"""

from __future__ import annotations

import concurrent.futures
import json
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import sentencepiece as spm

import harness
from openllama.cli import main as cli
from openllama.cli import parse_config
from openllama.eval.decode import generate
from openllama.eval.run import TASK_PACK
from openllama.services import free_port
from openllama.train.checkpoint import load_model, save_model
from openllama.train.convert.hf import export_hf
from openllama.train.model import LlamaConfig, init_params

REPO = Path(__file__).resolve().parents[1]
KEY = "test-key-0123"
NAME = "tiny"
MULTIPLE_CHOICE = ["local_arc", "local_hellaswag", "local_piqa", "local_boolq"]


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT/v1
    checkpoint: Path
    hf_dir: Path
    started: str  # what `openllama serve --detach` printed

    def post(self, body: dict | bytes, key: str | None = KEY) -> requests.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        if isinstance(body, bytes):
            return requests.post(f"{self.url}/completions", data=body, headers=headers, timeout=120)
        return requests.post(f"{self.url}/completions", json=body, headers=headers, timeout=120)


@pytest.fixture(scope="module")
def server(ray_head, sp_model, tmp_path_factory) -> Server:
    """The tiny model of the eval parity test (random weights, initializer_range 0.1), served on the session's
    head with a 100 ms batch window, so that concurrent requests meet in one batch."""
    root = tmp_path_factory.mktemp("serve")
    config = LlamaConfig.preset("tiny", initializer_range=0.1)
    ckpt = save_model(root / "ckpt", init_params(config, seed=5), config, sp_model)
    hf_dir = export_hf(ckpt, root / "hf")
    port = free_port()
    env = harness.clean_env(**ray_head.env, OPENLLAMA_API_KEY=KEY)
    command = [sys.executable, "-m", "openllama.cli", "serve", str(ckpt), "--name", NAME, "--port", str(port),
               "--batch-wait-ms", "100", "--detach"]
    done = harness.run(command, env, timeout=180, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    yield Server(f"http://127.0.0.1:{port}/v1", ckpt, hf_dir, done.stdout)
    stopped = harness.run([sys.executable, "-m", "openllama.cli", "serve", "--stop"], env, timeout=120, cwd=REPO)
    assert stopped.returncode == 0, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=5)


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0)


def test_detach_prints_the_url_and_a_curl_line(server):
    (line,) = [line for line in server.started.splitlines() if line.startswith("openllama serve:")]
    assert f"{NAME} at {server.url}" in line and f"curl {server.url}/completions" in line
    assert "Authorization: Bearer $OPENLLAMA_API_KEY" in line


def test_models_lists_the_served_model(client):
    assert [model.id for model in client.models.list().data] == [NAME]


def test_a_greedy_completion_equals_generate_token_for_token(server, client, sp_model):
    config, params, _ = load_model(server.checkpoint)
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    for prompt in ["Q: What is the largest animal?\nA:", "The"]:
        ids = [config.bos_token_id, *sp.encode(prompt)]
        expected = generate(params, config, ids, 24)
        answer = client.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0, logprobs=0)
        (choice,) = answer.choices
        assert choice.text == sp.decode(ids + expected)[len(sp.decode(ids)):]
        # every generated token is reported, the stop token too when one ended the text
        stopped = len(expected) < 24
        assert answer.usage.completion_tokens == len(expected) + stopped == len(choice.logprobs.tokens)
        assert choice.finish_reason == ("stop" if stopped else "length")


def test_a_seed_reproduces_a_sampled_completion(client):
    settings = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 16, "temperature": 1.0, "seed": 7}
    first, again = (client.completions.create(**settings).choices[0].text for _ in range(2))
    other = client.completions.create(**{**settings, "seed": 8}).choices[0].text
    assert first == again and first != other


def test_a_stream_sends_the_whole_text_in_chunks_then_done(server, client):
    settings = {"model": NAME, "prompt": "The sea", "max_tokens": 20, "temperature": 0}
    whole = client.completions.create(**settings).choices[0]
    chunks = list(client.completions.create(**settings, stream=True))
    assert len(chunks) > 1 and "".join(c.choices[0].text for c in chunks) == whole.text
    assert [c.choices[0].finish_reason for c in chunks][-1] == whole.finish_reason
    raw = server.post({**settings, "stream": True, "stream_options": {"include_usage": True}})
    events = [line for line in raw.text.split("\n\n") if line]
    assert raw.headers["content-type"].startswith("text/event-stream") and events[-1] == "data: [DONE]"
    assert all(event.startswith("data: {") for event in events[:-1])
    assert json.loads(events[-2][len("data: "):])["usage"]["completion_tokens"] == 20


def test_a_stop_string_ends_the_text_before_it(client):
    settings = {"model": NAME, "prompt": "Q: What is 2 + 3?\nA:", "max_tokens": 24, "temperature": 0}
    free = client.completions.create(**settings).choices[0].text
    stop = free[5:7]
    cut = client.completions.create(**settings, stop=[stop]).choices[0]
    streamed = "".join(c.choices[0].text for c in client.completions.create(**settings, stop=stop, stream=True))
    assert cut.text == streamed == free[: free.index(stop)] and cut.finish_reason == "stop"


def test_concurrent_requests_are_decoded_in_one_batch_with_the_answers_they_get_alone(server):
    prompts = [" ".join(["word"] * (i + 1)) for i in range(8)]
    body = {"model": NAME, "max_tokens": 12, "temperature": 0}
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda p: server.post({**body, "prompt": p}), prompts))
    assert [r.status_code for r in together] == [200] * len(prompts)
    assert max(int(r.headers["openllama-batch-rows"]) for r in together) > 1
    alone = [server.post({**body, "prompt": p}) for p in prompts]
    assert [r.json()["choices"][0]["text"] for r in together] == [r.json()["choices"][0]["text"] for r in alone]


def test_a_request_joins_a_batch_already_decoding_and_gets_the_answer_it_gets_alone(server):
    """Continuous batching: a long streamed completion is decoding when a short one arrives; the short one
    takes a free slot of that batch (it shares the decode) instead of waiting for it to end."""
    long = {"model": NAME, "prompt": "The", "max_tokens": 200, "temperature": 0}
    short = {"model": NAME, "prompt": "word word", "max_tokens": 12, "temperature": 0}
    headers = {"Authorization": f"Bearer {KEY}"}
    with requests.post(f"{server.url}/completions", json={**long, "stream": True}, headers=headers, stream=True,
                       timeout=120) as streamed:
        events = streamed.iter_lines()
        first = next(line for line in events if line)  # the long row is decoding now
        joined = server.post(short)
        rest = [line for line in events if line]
    assert joined.status_code == 200 and int(joined.headers["openllama-batch-rows"]) == 2
    assert rest[-1] == b"data: [DONE]"
    texts = [json.loads(line[len(b"data: "):])["choices"][0]["text"] for line in [first, *rest[:-1]]]
    assert "".join(texts) == server.post(long).json()["choices"][0]["text"]
    assert joined.json()["choices"][0]["text"] == server.post(short).json()["choices"][0]["text"]


BAD_REQUESTS = {
    "unknown model": ({"model": "gpt-4", "prompt": "hi"}, "model"),
    "max_tokens beyond the context": ({"model": NAME, "prompt": "hi", "max_tokens": 300}, "max_tokens"),
    "malformed JSON": (b'{"model": "tiny", "prompt": ', None),
    "not an object": (b'["tiny"]', None),
    "missing prompt": ({"model": NAME}, "prompt"),
    "prompt of a wrong type": ({"model": NAME, "prompt": 3}, "prompt"),
    "token id outside the vocabulary": ({"model": NAME, "prompt": [1, 99999]}, "prompt"),
    "max_tokens a string": ({"model": NAME, "prompt": "hi", "max_tokens": "8"}, "max_tokens"),
    "temperature a string": ({"model": NAME, "prompt": "hi", "temperature": "hot"}, "temperature"),
    "stop of numbers": ({"model": NAME, "prompt": "hi", "stop": [1, 2]}, "stop"),
    "logprobs beyond 5": ({"model": NAME, "prompt": "hi", "logprobs": 9}, "logprobs"),
    "n above 1": ({"model": NAME, "prompt": "hi", "n": 2}, "n"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_a_bad_request_gets_400_with_openais_error_object_and_the_server_keeps_serving(server, case):
    body, param = BAD_REQUESTS[case]
    refused = server.post(body)
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert server.post({"model": NAME, "prompt": "hi", "max_tokens": 2}).status_code == 200


def test_an_unknown_route_is_404_in_the_same_shape(server):
    refused = requests.post(f"{server.url}/chat/completions", json={}, headers={"Authorization": f"Bearer {KEY}"})
    assert refused.status_code == 404 and "no chat template" in refused.json()["error"]["message"]


@pytest.mark.parametrize("key", [None, "wrong"])
def test_without_the_api_key_requests_get_401(server, key):
    for refused in (server.post({"model": NAME, "prompt": "hi"}, key=key),
                    requests.get(f"{server.url}/models", headers={"Authorization": f"Bearer {key}"} if key else {})):
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"


def test_a_host_beyond_loopback_needs_an_api_key(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OPENLLAMA_API_KEY", raising=False)
    assert cli(["serve", str(tmp_path), "--host", "0.0.0.0"]) == 2  # refused before anything starts
    assert capsys.readouterr().err.strip().splitlines() == [
        "openllama serve: host=0.0.0.0 is reachable from other machines: set OPENLLAMA_API_KEY (or api_key) so that "
        "only clients with the key are answered, or listen on 127.0.0.1"]
    monkeypatch.setenv("OPENLLAMA_API_KEY", KEY)
    assert parse_config("serve", [str(tmp_path), "--host", "0.0.0.0"]).key() == KEY


def evaluate(model, model_args: str | None, tasks: list[str]) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASK_PACK), include_defaults=False)
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, task_manager=manager, limit=4,
                                   log_samples=True, bootstrap_iters=0)


def per_item(results: dict, task: str) -> list:
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [r[0] if isinstance(r, tuple | list) else r for s in samples for r in s["filtered_resps"]]


def test_lm_evals_local_completions_model_through_the_server_equals_the_in_process_backend(server, monkeypatch):
    """lm-eval sends token ids (tokenized by the export's tokenizer.json, BOS first as our backend does) with
    echo, logprobs=1 and max_tokens=1, and sums the echoed prompt's log-probabilities. Rolling windows encode
    the document without BOS and condition it on one (add_bos_token=False), as our backend does."""
    from openllama.eval.backend import OpenLlamaLM

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    api = (f"model={NAME},base_url={server.url}/completions,tokenizer={server.hf_dir},tokenizer_backend=huggingface,"
           "max_length=256,batch_size=16,max_retries=1")
    tasks = [*MULTIPLE_CHOICE, "local_arithmetic"]
    ours = evaluate(OpenLlamaLM(str(server.checkpoint), batch_size=8), None, [*tasks, "local_text_perplexity"])
    theirs = evaluate("local-completions", api + ",add_bos_token=True", tasks)
    rolling = evaluate("local-completions", api + ",add_bos_token=False", ["local_text_perplexity"])
    for task in MULTIPLE_CHOICE:
        assert per_item(theirs, task) == pytest.approx(per_item(ours, task), abs=1e-4)
        for metric in ("acc,none", "acc_norm,none"):
            assert theirs["results"][task].get(metric) == ours["results"][task].get(metric)
    # the server's text keeps the space SentencePiece puts before a continuation's first word; the backend
    # decodes the continuation alone, as lm-eval's hf backend does: the same after exact_match's stripping
    assert [t.strip() for t in per_item(theirs, "local_arithmetic")] == \
           [t.strip() for t in per_item(ours, "local_arithmetic")]
    assert theirs["results"]["local_arithmetic"]["exact_match,none"] == \
           ours["results"]["local_arithmetic"]["exact_match,none"]
    task = "local_text_perplexity"
    assert per_item(rolling, task) == pytest.approx(per_item(ours, task), rel=1e-6, abs=1e-4)


def answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=5).ok
    except requests.RequestException:  # not listening yet, or the proxy holds the request until the app is up
        return False


def test_in_the_foreground_it_prints_one_line_and_stops_cleanly_on_sigterm(server):
    port = free_port()
    env = harness.clean_env()  # no RAY_ADDRESS: a Ray of its own, in the process
    command = [sys.executable, "-m", "openllama.cli", "serve", str(server.checkpoint), "--port", str(port)]
    proc = harness.start(command, env, cwd=REPO)
    try:
        harness.wait_for(lambda: answers(f"http://127.0.0.1:{port}/v1/models"), 120, "the endpoint", proc, poll=0.5)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    except BaseException:
        harness.kill_group(proc)
        raise
    assert proc.returncode == 0, err[-3000:]
    (line,) = [line for line in out.splitlines() if line.startswith("openllama serve:")]
    assert f"ckpt at http://127.0.0.1:{port}/v1 (Ctrl-C ends it)" in line and "Authorization" not in line
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=5)


BUILD_CONFIGS = """
import json, sys, yaml
from ray import serve
from ray.serve.schema import ServeDeploySchema
from openllama.eval.serve import app_builder
from openllama.eval.endpoint import CompletionServer
found = {}
for path in sys.argv[1:]:
    config = yaml.safe_load(open(path))
    ServeDeploySchema.parse_obj(config)
    for app in config["applications"]:
        if app["import_path"].startswith("openllama."):
            assert isinstance(app_builder(app["args"]), serve.Application)
            found[path] = [CompletionServer.name, [d["name"] for d in app["deployments"]]]
print(json.dumps(found))
"""


def test_the_shipped_serve_configs_are_valid_and_build_the_application():
    """Ray's own schema for `serve run`/`serve deploy` files, and our builder on their args. The Ray Serve LLM
    file (llm.yaml) is checked against the schema only: `ray.serve.llm` does not import without vLLM."""
    configs = sorted(str(p) for p in (REPO / "configs" / "serve").glob("*.yaml"))
    env = harness.clean_env(OPENLLAMA_API_KEY=KEY, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    done = subprocess.run([sys.executable, "-c", BUILD_CONFIGS, *configs], env=env, capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    built = json.loads(done.stdout.strip().splitlines()[-1])
    assert {Path(p).name for p in built} == {"tiny.yaml", "cluster.yaml"} and len(configs) == 3
    assert all(name == "CompletionServer" and names == [name] for name, names in built.values())

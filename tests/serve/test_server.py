"""`loraforge serve` on two tiny llama runs that share one base, started on a free port on 127.0.0.1 and called
with the real `openai` client: routing by run name, streaming, greedy answers equal to `loraforge chat`,
concurrent clients batched with nothing mixed up, seeds, stop strings, and OpenAI-shaped 4xx errors."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from loraforge.config import load_config
from loraforge.model.load import DTYPES
from loraforge.training.run import run_training
from tests.conftest import NATIVE_BF16, write_tiny_config

KEY = "test-key"
WORDS = ["red", "green", "blue", "black", "white", "pink", "gray", "gold"]


@pytest.fixture(scope="module")
def server(runs):
    from loraforge.serve.run import Background, build

    app, engine, names = build([str(r) for r in runs], api_key=KEY, max_batch=32, timeout_s=60)
    background = Background(app)
    yield background, engine, names
    background.stop()
    engine.close()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server[0].url}/v1", api_key=KEY, timeout=60, max_retries=0)


def chat(client, model, prompt, **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                          temperature=kw.pop("temperature", 0), **kw)


def test_both_runs_and_their_base_are_served_from_one_copy_of_the_base(runs, server, client, tiny_model_dir):
    from loraforge.serve.models import load_served

    _, _, names = server
    assert names == ["echo-a", "echo-b", str(tiny_model_dir)]
    assert [m.id for m in client.models.list().data] == names
    served = load_served([str(r) for r in runs])
    assert served["echo-a"].base is served["echo-b"].base is served[str(tiny_model_dir)].base
    assert served["echo-a"].base.adapters == ["echo-a", "echo-b"]


def test_greedy_answers_over_http_equal_loraforge_chat(runs, client, capsys):
    from loraforge.chat import run_chat

    for run in runs:
        capsys.readouterr()
        run_chat(run, prompt="Echo red")
        expected = capsys.readouterr().out.strip()
        answer = chat(client, run.name, "Echo red")
        assert answer.choices[0].message.content == expected and expected
        assert answer.model == run.name and answer.usage.completion_tokens >= 1
        assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_the_two_runs_answer_differently_and_stream_what_they_answer_whole(runs, client):
    whole = {run.name: chat(client, run.name, "Echo blue", max_tokens=6) for run in runs}
    assert whole["echo-a"].choices[0].message.content != whole["echo-b"].choices[0].message.content
    for name, answer in whole.items():
        chunks = list(chat(client, name, "Echo blue", max_tokens=6, stream=True))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == answer.choices[0].message.content, "streamed as sent whole: stripped"
        assert chunks[-1].choices[0].finish_reason == answer.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens


def test_completions_and_sampling_with_a_seed_repeat(client):
    first = client.completions.create(model="echo-a", prompt="Echo gold", max_tokens=5, temperature=1.0, seed=7)
    again = client.completions.create(model="echo-a", prompt="Echo gold", max_tokens=5, temperature=1.0, seed=7)
    assert first.choices[0].text == again.choices[0].text and first.usage.completion_tokens == 5


def test_a_stop_string_ends_the_answer_before_it(client):
    full = chat(client, "echo-b", "Echo pink", max_tokens=6).choices[0].message.content
    assert len(full) >= 3
    stop = full[2:4]
    cut = chat(client, "echo-b", "Echo pink", max_tokens=6, stop=[stop]).choices[0]
    assert cut.message.content == full[: full.index(stop)].strip() and cut.finish_reason == "stop"


@pytest.mark.parametrize("text, stop", [("graygraygray", "yg"), ("graygraygray", "ray"), ("gray gray gray", "gray g"),
                                        ("gray gray gray", "rayx"), ("gray gray gray", "y"), ("gray gray", "ay g")])
def test_text_that_may_begin_a_stop_string_is_held_back_until_it_is_known(tokenizer, text, stop):
    """A stop string that starts inside a token: what was streamed before the cut is never taken back, so the
    start of a possible stop string waits for the next tokens."""
    from types import SimpleNamespace

    from loraforge.serve.engine import Job

    tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    streamed, ends = [], []
    job = Job(SimpleNamespace(stop_ids=frozenset(), tokenizer=tokenizer), [], max_tokens=100, temperature=0,
              top_p=1, stop=[stop], seed=None,
              deliver=lambda event: (streamed if event[0] == "delta" else ends).append(event[1]))
    for token in tokens:
        job.take(token)
    job.finish("length")
    expected = text[: text.index(stop)] if stop in text else text
    assert "".join(streamed) == job.text == expected
    assert ends == ["stop" if stop in text else "length"]


def test_a_temperature_near_zero_answers_as_greedy_does_beside_other_requests(server, client):
    greedy = chat(client, "echo-a", "Echo gray", max_tokens=4).choices[0].message.content
    answers = [None, None]

    def call(index, temperature):
        answers[index] = chat(client, "echo-a", "Echo gray", max_tokens=4, temperature=temperature, seed=3)

    threads = [threading.Thread(target=call, args=(0, 1e-320)), threading.Thread(target=call, args=(1, 1.0))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert answers[0].choices[0].message.content == greedy
    assert answers[1].choices[0].finish_reason in ("stop", "length")


def test_n_null_and_parameters_that_ask_for_nothing_get_one_answer(server):
    response = httpx.post(f"{server[0].url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
                          json={"model": "echo-a", "n": None, "max_tokens": 2, "logprobs": False, "presence_penalty": 0,
                                "frequency_penalty": 0.0, "tools": [], "response_format": {"type": "text"},
                                "messages": [{"role": "user", "content": "Echo red"}]})
    assert response.status_code == 200 and len(response.json()["choices"]) == 1


def test_a_completion_prompt_too_long_names_prompt(server):
    response = httpx.post(f"{server[0].url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
                          json={"model": "echo-a", "prompt": "red " * 2000})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"


def test_32_concurrent_clients_each_get_their_own_answer_in_shared_batches(server, client):
    _, engine, _ = server
    requests = [("echo-a" if i % 2 else "echo-b", f"Echo {WORDS[i % 8]}{'!' * (i // 8)}") for i in range(32)]
    expected = [chat(client, model, prompt, max_tokens=4).choices[0].message.content for model, prompt in requests]
    engine.batch_sizes.clear()
    answers: list = [None] * 32
    start = threading.Barrier(32)

    def call(index):
        start.wait(timeout=30)
        model, prompt = requests[index]
        answers[index] = chat(client, model, prompt, max_tokens=4).choices[0].message.content

    threads = [threading.Thread(target=call, args=(i,)) for i in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert answers == expected, "every client got the answer its own request gets alone"
    assert sum(engine.batch_sizes) == 32 and max(engine.batch_sizes) > 1, "generated in shared batches"


def test_a_client_that_leaves_frees_its_place(server, client):
    _, engine, _ = server
    engine.finished.clear()
    with httpx.stream("POST", f"{server[0].url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "echo-a", "stream": True, "max_tokens": 400,
                            "messages": [{"role": "user", "content": "Echo red"}]}, timeout=30) as response:
        assert response.status_code == 200
        next(response.iter_lines())
    deadline = time.monotonic() + 20
    while not engine.finished and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.finished[0][0] == "cancelled"
    assert engine.finished[0][1] < 400, "the abandoned row stopped instead of generating 400 tokens"


@pytest.mark.parametrize("body, status, expected", [
    (b"{not json", 400, "the body is not valid JSON"),
    (b"[1, 2]", 400, "the body must be a JSON object"),
    ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model 'nope' is not served here"),
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model is required: one of echo-a"),
    ({"model": 3, "messages": [{"role": "user", "content": "hi"}]}, 400, "model must be text, one of echo-a"),
    ({"model": "echo-a", "messages": "hi"}, 400, "messages must be a non-empty list"),
    ({"model": "echo-a", "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role is 'robot'"),
    ({"model": "echo-a", "messages": [{"role": "user", "content": 3}]}, 400, "messages[0].content must be text"),
    ({"model": "echo-a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, 400,
     "passes the model's context"),
    ({"model": "echo-a", "messages": [{"role": "user", "content": "red " * 1100}], "max_tokens": 2}, 400,
     "tokens fill the model's context of 1024; shorten it"),
    (b'{"model": "echo-a", "messages": [{"role": "user", "content": "Echo \\udcff"}]}', 400,
     "the prompt is not UTF-8 text (character 6 is a byte that is not UTF-8)"),
    ({"model": "echo-a", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400,
     "temperature must be a number"),
    ({"model": "echo-a", "messages": [{"role": "user", "content": "hi"}], "n": 3}, 400, "n must be 1"),
    ({"model": "echo-a", "messages": [{"role": "user", "content": "x" * (2 << 20)}]}, 413, "is over"),
    ({"model": "echo-a", "messages": [{"role": "user", "content": "hi"}], "seed": 10**20}, 400,
     "seed must be an integer from 0 to"),
    (b"[" * 100_000, 400, "nested too deeply"),
    ({"model": "echo-a", "messages": [{"role": "user", "content": "hi"}], "stop": ["x" * 300]}, 400,
     "up to 4 strings of 1 to 256 characters"),
    ({"model": "echo-a", "messages": [{"role": "user", "content": "hi"}], "logprobs": True}, 400,
     "logprobs is not supported by this server"),
    ({"model": "echo-a", "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}},
     400, "response_format is not supported"),
    ({"model": "echo-a", "messages": [{"role": "user", "content": "hi"}], "presence_penalty": 0.5}, 400,
     "presence_penalty is not supported"),
    (b'{"max_tokens": ' + b"1" * 5001 + b"}", 400, "the body is not valid JSON"),
])
def test_bad_requests_get_an_openai_error_and_a_4xx(server, body, status, expected):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{server[0].url}/v1/chat/completions", content=content, timeout=30,
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert expected in error["message"] and error["type"]
    assert httpx.get(f"{server[0].url}/health", timeout=10).json()["status"] == "ok", "the server lives on"


def test_a_completion_prompt_that_is_not_utf8_gets_a_400(server):
    """It was a 500 with a plain-text body and a traceback in the log."""
    response = httpx.post(f"{server[0].url}/v1/completions", timeout=30,
                          content=b'{"model": "echo-a", "prompt": "Echo \\ud800"}',
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("the prompt is not UTF-8 text (character 6")
    assert response.json()["error"]["param"] == "prompt"


def test_without_the_key_every_request_is_refused(server):
    response = httpx.get(f"{server[0].url}/v1/models", timeout=10)
    assert response.status_code == 401 and "API key" in response.json()["error"]["message"]
    assert httpx.get(f"{server[0].url}/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401


@pytest.mark.parametrize("text", ["  Hello world \n", "\n\n", "a", " a  b\tc \n", ""])
def test_a_streamed_chat_answer_is_stripped_as_the_whole_one_is_at_every_split(text):
    from loraforge.serve.app import Stripped

    for first in range(len(text) + 1):
        for second in range(first, len(text) + 1):
            stream = Stripped()
            pieces = [text[:first], text[first:second], text[second:]]
            assert "".join(stream.feed(piece) for piece in pieces) == text.strip(), pieces


@pytest.mark.integration
@pytest.mark.slow
def test_loraforge_serve_as_a_process_serves_a_dora_run_and_a_full_fine_tune_as_chat_answers_them(
        tmp_path, tiny_model_dir, capsys):
    """The command itself, in its own process: it starts, serves a DoRA adapter and a fully fine-tuned model
    (which loads as a model of its own), answers each greedily as `loraforge chat` does, and stops on Ctrl-C. A run
    whose chat template never finishes rendering gets a 400 once the render time limit passes (the limit is a
    timer signal, which only the main thread takes: the command serves from it), and the others answer after."""
    import shutil
    import signal
    import socket
    import subprocess
    import sys

    from loraforge.chat import run_chat
    from tests.conftest import ROOT

    config_path = write_tiny_config(tmp_path, tiny_model_dir, "{max_steps: 4, batch_size: 4, save_every: null, "
                                                              "eval_every: 1000}", max_new_tokens=6)
    runs = {}
    for name, settings in (("dora", ["lora.use_dora=true", "train.learning_rate=0.05"]),
                           ("full", ["adapter=full", "train.learning_rate=0.01"])):
        run_training(load_config(config_path, [f"output_dir={tmp_path / name}", "eval.sample_prompts=[]", *settings]))
        runs[name] = tmp_path / name
    runs["looping"] = tmp_path / "looping"
    shutil.copytree(runs["full"], runs["looping"])
    (runs["looping"] / "tokenizer" / "chat_template.jinja").write_text(
        "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}", encoding="utf-8")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "loraforge", "serve", *map(str, runs.values()),
                                "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()[1][-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        began = time.monotonic()
        looping = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": "looping", "messages": [{"role": "user", "content": "Echo red"}]})
        assert looping.status_code == 400 and time.monotonic() - began < 30, looping.text
        assert "did not finish rendering one conversation in 10 s" in looping.json()["error"]["message"]
        for name, run in list(runs.items())[:2]:
            capsys.readouterr()
            run_chat(run, prompt="Echo red")
            expected = capsys.readouterr().out.strip()
            reply = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
                "model": name, "temperature": 0, "messages": [{"role": "user", "content": "Echo red"}]})
            assert reply.status_code == 200, reply.text
            answer = reply.json()
            assert answer["choices"][0]["message"]["content"] == expected and expected, name
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 130, err[-3000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "error: stopped by SIGINT: no request was in flight"
    assert f"base {tiny_model_dir} loaded with run dora:" in err and "run full: its own fine-tuned model" in err
    assert f"serving dora, full, looping, {tiny_model_dir} at http://127.0.0.1:{port}/v1" in err


def test_a_dora_run_and_its_base_answer_as_chat_does(tmp_path, tiny_model_dir, capsys):
    """DoRA layers take no per-row adapter names: the server generates a DoRA run's rows apart from its base's. The
    run answers as `loraforge chat` does; the base, with the adapter off, as the plain model does."""
    import torch
    from transformers import AutoModelForCausalLM

    from loraforge.chat import run_chat
    from loraforge.model.load import load_tokenizer
    from loraforge.model.template import apply_template
    from loraforge.serve.run import Background, build

    config_path = write_tiny_config(tmp_path, tiny_model_dir, "{max_steps: 4, batch_size: 4, save_every: null, "
                                                              "eval_every: 1000}", max_new_tokens=6)
    run = tmp_path / "dora"
    run_training(load_config(config_path, [f"output_dir={run}", "eval.sample_prompts=[]", "lora.use_dora=true",
                                           "train.learning_rate=0.05"]))
    app, engine, names = build([str(run)], api_key=None, max_batch=8, timeout_s=60)
    background = Background(app)
    try:
        capsys.readouterr()
        run_chat(run, prompt="Echo red")
        expected = capsys.readouterr().out.strip()
        body = {"temperature": 0, "messages": [{"role": "user", "content": "Echo red"}]}
        replies = [httpx.post(f"{background.url}/v1/chat/completions", json={**body, "model": name}, timeout=60)
                   for name in names]
    finally:
        background.stop()
        engine.close()
    assert [r.status_code for r in replies] == [200, 200], replies[0].text
    assert replies[0].json()["choices"][0]["message"]["content"] == expected and expected
    assert names == ["dora", str(tiny_model_dir)]
    tokenizer = load_tokenizer(str(tiny_model_dir))
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prompt = apply_template(tokenizer, [{"role": "user", "content": "Echo red"}], add_generation_prompt=True,
                            tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        out = plain.generate(**prompt, max_new_tokens=6, do_sample=False)
    base_answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert replies[1].json()["choices"][0]["message"]["content"] == base_answer and base_answer != expected


def test_a_port_already_taken_is_refused_before_any_model_loads(tmp_path):
    import socket

    from loraforge.errors import LoraforgeError
    from loraforge.serve.run import run_server

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(LoraforgeError, match=rf"--port {port}: 127.0.0.1:{port} cannot be listened on .*--port"):
            run_server([str(tmp_path / "no-such-run")], port=port, engine="hf")


def test_a_completion_prompt_is_tokenized_as_plain_text_training_tokenized_its_rows(tmp_path, tokenizer, smollm_path):
    """With a tokenizer that puts BOS before every text (as Llama's and Mistral's do), a plain-text run trained on
    BOS + text; /v1/completions asks it the same way."""
    import shutil

    from loraforge.data.render import render
    from loraforge.data.formats import Conversation
    from loraforge.model.load import load_tokenizer
    from loraforge.serve.run import Background, build
    from tests.conftest import save_tiny_llama, write_jsonl

    with_bos = tmp_path / "with-bos-tokenizer"
    with_bos.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{smollm_path}/{name}", with_bos / name)
    spec = json.loads((with_bos / "tokenizer.json").read_text())
    bos = tokenizer.bos_token
    spec["post_processor"] = {"type": "TemplateProcessing",
                              "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                              "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                       {"Sequence": {"id": "B", "type_id": 1}}],
                              "special_tokens": {bos: {"id": bos, "ids": [tokenizer.bos_token_id], "tokens": [bos]}}}
    (with_bos / "tokenizer.json").write_text(json.dumps(spec))
    bos_tokenizer = load_tokenizer(str(with_bos))
    model = save_tiny_llama(tmp_path / "model", bos_tokenizer)
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": f"The {w} sky."} for w in WORDS * 2])
    config = tmp_path / "text.yaml"
    config.write_text(f"model: {{name: {model}}}\nlora: {{r: 4, alpha: 8}}\n"
                      f"data: {{sources: [{{path: {data}, format: text}}], val_fraction: 0.25, cache: false}}\n"
                      "train: {max_steps: 1, batch_size: 4, save_every: null, eval_every: 1000}\n"
                      "eval: {sample_prompts: []}\nreport_to: []\n", encoding="utf-8")
    run = tmp_path / "text-run"
    run_training(load_config(config, [f"output_dir={run}"]))
    trained_ids, _ = render(Conversation(text="The red sky"), load_tokenizer(str(run / "tokenizer")), frozenset())
    assert trained_ids[0] == tokenizer.bos_token_id
    app, engine, _ = build([str(run)], max_batch=4, timeout_s=60)
    background = Background(app)
    try:
        reply = httpx.post(f"{background.url}/v1/completions", timeout=60,
                           json={"model": "text-run", "prompt": "The red sky", "max_tokens": 1, "temperature": 0})
    finally:
        background.stop()
        engine.close()
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["prompt_tokens"] == len(trained_ids) - 1, "training's ids without the EOS it appends"


def test_a_request_that_fails_inside_a_batch_gets_a_500_and_the_others_their_answers(runs, caplog):
    """One prompt makes the model's forward raise at every step after the first of any batch it is in, after each
    row has streamed a token: that request alone gets a 500 with OpenAI's error body and one logged traceback; the
    others in its batch, streamed or whole, get the answers they get alone."""
    import logging

    import torch

    from loraforge.eval.generate import prompt_ids
    from loraforge.serve.app import build_app
    from loraforge.serve.engine import Engine
    from loraforge.serve.models import load_served
    from loraforge.serve.run import Background

    served = load_served([str(r) for r in runs])
    engine = Engine(max_batch=8, gather_s=0)
    background = Background(build_app(served, engine, timeout_s=60))
    url = f"{background.url}/v1/chat/completions"
    asked = [("echo-a", "Echo red", False), ("echo-b", "Echo blue", False), ("echo-a", "Echo green", True),
             ("echo-b", "Echo gold", True), ("echo-a", "Echo zebra xylophone", False)]

    def ask(index):
        model, prompt, stream = asked[index]
        body = {"model": model, "temperature": 0, "max_tokens": 6, "stream": stream,
                "messages": [{"role": "user", "content": prompt}]}
        if not stream:
            return httpx.post(url, json=body, timeout=60)
        with httpx.stream("POST", url, json=body, timeout=60) as response:
            events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
        return "".join(e["choices"][0]["delta"].get("content", "") for e in events if e.get("choices"))

    poison = set(prompt_ids(served["echo-a"].tokenizer, [{"role": "user", "content": asked[-1][1]}]))
    for model, prompt, _ in asked[:-1]:
        poison -= set(prompt_ids(served[model].tokenizer, [{"role": "user", "content": prompt}]))
    poison = torch.tensor(sorted(poison))
    batch = {"poisoned": False}

    def fail_with_the_poisoned_prompt(module, args):
        if args[0].shape[1] > 1:
            batch["poisoned"] = bool(torch.isin(args[0], poison).any())
        elif batch["poisoned"]:
            raise RuntimeError("injected failure")

    try:
        alone = [ask(i) for i in range(len(asked))]
        assert alone[-1].json()["usage"]["completion_tokens"] == 6, "a step after each batch's first, where it fails"
        embeddings = served["echo-a"].base.model.get_input_embeddings()
        hook = embeddings.register_forward_pre_hook(fail_with_the_poisoned_prompt)
        engine.gather_s = 2.0
        engine.batch_sizes.clear()
        answers = [None] * len(asked)
        start = threading.Barrier(len(asked))

        def call(index):
            start.wait(timeout=30)
            answers[index] = ask(index)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(asked))]
        with caplog.at_level(logging.WARNING, logger="loraforge.serve"):
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=120)
        hook.remove()
        assert not any(thread.is_alive() for thread in threads)
    finally:
        background.stop()
        engine.close()
    assert engine.batch_sizes[0] == len(asked), "the five requests shared one batch"
    assert len(engine.batch_sizes) <= 1 + 2 * 3, "then a try for each half of at most three splits down to the row"
    failed = answers[-1]
    assert failed.status_code == 500
    assert failed.json()["error"] == {"message": "generation failed: RuntimeError: injected failure",
                                      "type": "server_error", "param": None, "code": 500}
    for index, (_, _, stream) in enumerate(asked[:-1]):
        got, expected = answers[index], alone[index]
        if not stream:
            assert got.status_code == 200, got.text
            got, expected = (r.json()["choices"][0]["message"]["content"] for r in (got, expected))
        assert got == expected and expected, asked[index]
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and str(tracebacks[0].exc_info[1]) == "injected failure"


def echo_jobs(served, words, runs=("echo-a", "echo-b"), **kw):
    """A Job per word asking one of the runs in turn to echo it, greedily; each collects what it is sent in .events."""
    from loraforge.eval.generate import prompt_ids
    from loraforge.serve.engine import Job

    jobs = []
    for i, word in enumerate(words):
        served_run = served[runs[i % len(runs)]]
        events = []
        job = Job(served_run, prompt_ids(served_run.tokenizer, [{"role": "user", "content": f"Echo {word}"}]),
                  **{"max_tokens": 6, "temperature": 0.0, "top_p": 1.0, "stop": [], "seed": None, **kw},
                  deliver=events.append)
        job.events = events
        jobs.append(job)
    return jobs


def run_together(engine, jobs) -> None:
    for job in jobs:
        engine.submit(job)
    deadline = time.monotonic() + 60
    while not all(job.finish_reason for job in jobs) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(job.finish_reason for job in jobs)


def test_two_bad_rows_one_in_each_half_fail_alone_and_the_others_get_their_answers(runs, caplog):
    """Two rows whose prompts hold a token past the vocabulary (both fail with one IndexError) in opposite halves of
    a batch: both halves fail as the batch did, yet the failure is those two rows', so the halves are split down to
    them. They get the error; the four others the answers they get alone; one traceback."""
    import logging

    from loraforge.serve.engine import Engine
    from loraforge.serve.models import load_served

    served = load_served([str(r) for r in runs])
    engine = Engine(max_batch=8, gather_s=1.0)
    try:
        alone = []
        for job in echo_jobs(served, WORDS[:6]):
            run_together(engine, [job])
            alone.append(job.text)
        jobs = echo_jobs(served, WORDS[:6])
        past_the_vocabulary = served["echo-a"].base.model.get_input_embeddings().num_embeddings
        for bad in (jobs[1], jobs[4]):
            bad.prompt_ids = [*bad.prompt_ids, past_the_vocabulary]
        engine.batch_sizes.clear()
        with caplog.at_level(logging.WARNING, logger="loraforge.serve"):
            run_together(engine, jobs)
    finally:
        engine.close()
    assert engine.batch_sizes[0] == 6, "one batch, halves of rows 0-2 and 3-5"
    assert [job.finish_reason for job in jobs] == ["length", "error", "length", "length", "error", "length"]
    assert [job.text for job in jobs if job.finish_reason != "error"] == [alone[i] for i in (0, 2, 3, 5)]
    assert all(alone)
    assert jobs[1].events == jobs[4].events == [("error", "generation failed: IndexError: index out of range in self")]
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and isinstance(tracebacks[0].exc_info[1], IndexError)


def test_a_failure_every_row_meets_fails_each_row_alone_with_one_traceback(runs, caplog):
    """Every generation fails at its third step: each request gets the error once its row fails alone (splitting
    down to the rows, as a failure of two rows in opposite halves needs) and the log holds one traceback, not one
    per request. A row whose answer ends in a half before that keeps it."""
    import logging

    from loraforge.serve.engine import Engine
    from loraforge.serve.models import load_served

    served = load_served([str(r) for r in runs])
    engine = Engine(max_batch=8, gather_s=1.0)
    jobs = echo_jobs(served, WORDS[:5], max_tokens=20)
    jobs[0].max_tokens = 3
    steps = {"since_prompt": 0}

    def fail_at_the_third_step(module, args):
        steps["since_prompt"] = 0 if args[0].shape[1] > 1 else steps["since_prompt"] + 1
        if steps["since_prompt"] == 2:
            raise RuntimeError("injected failure")

    hook = served["echo-a"].base.model.get_input_embeddings().register_forward_pre_hook(fail_at_the_third_step)
    try:
        with caplog.at_level(logging.WARNING, logger="loraforge.serve"):
            run_together(engine, jobs)
    finally:
        hook.remove()
        engine.close()
    assert list(engine.batch_sizes) == [5, 2, 1, 3, 1, 2, 1, 1], "the first half's other row alone once it ended"
    assert (jobs[0].events[-1], len(jobs[0].tokens)) == (("done", "length"), 3), "its third token came in its half"
    assert all(job.events[-1] == ("error", "generation failed: RuntimeError: injected failure") for job in jobs[1:])
    assert [kind for job in jobs for kind, _ in job.events].count("error") == 4
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and str(tracebacks[0].exc_info[1]) == "injected failure"


@pytest.mark.parametrize("machine, expected", [("native", "bf16"), ("emulated", "fp32")])
def test_a_bf16_run_is_chatted_and_served_in_bf16_where_bf16_is_fast_here_else_in_fp32(
        train_tiny, cpu_like, caplog, capsys, machine, expected):
    import logging

    import torch

    from loraforge.chat import run_chat
    from loraforge.serve.models import load_served
    from loraforge.serve.run import Background, build
    from loraforge.trained import load_run
    from tests.conftest import EMULATED_BF16, NATIVE_BF16

    config, _ = train_tiny("precision=bf16", "train.learning_rate=0.05")
    run = config.output_dir
    cpu_like(NATIVE_BF16 if machine == "native" else EMULATED_BF16)
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="loraforge"):
        run_chat(run, prompt="Echo red")
    said = capsys.readouterr().out.strip()
    chosen = [r.getMessage() for r in caplog.records if "computing in" in r.getMessage()]
    assert len(chosen) == 1 and chosen[0].startswith(f"{Path(run).name}: computing in {expected}, "), chosen
    dtype = getattr(torch, DTYPES[expected])
    assert load_run(run, precision="auto").model.get_input_embeddings().weight.dtype == dtype
    assert load_served([run])[Path(run).name].base.model.get_input_embeddings().weight.dtype == dtype

    app, engine, names = build([run], timeout_s=60)
    background = Background(app)
    try:
        answer = httpx.post(f"{background.url}/v1/chat/completions", timeout=60, json={
            "model": names[0], "temperature": 0, "messages": [{"role": "user", "content": "Echo red"}]})
    finally:
        background.stop()
        engine.close()
    assert answer.json()["choices"][0]["message"]["content"] == said and said, "the greedy answer chat gives"


def test_serve_computes_a_bf16_run_as_chat_does_to_the_last_bit(train_tiny, cpu_like):
    """Greedy answers equal chat's only where every number is: the logits serve computes for a request of a bf16
    run equal chat's bit for bit (its LoRA layers under bf16 autocast too), or a near-tie can go the other way."""
    import torch

    from loraforge.eval.generate import generate
    from loraforge.serve.engine import Engine
    from loraforge.serve.models import load_served
    from loraforge.trained import load_run

    config, _ = train_tiny("precision=bf16", "train.learning_rate=0.05")
    run = Path(config.output_dir)
    cpu_like(NATIVE_BF16)

    def first_logits(model, answer) -> torch.Tensor:
        seen = []
        hook = model.get_output_embeddings().register_forward_hook(
            lambda module, args, out: seen.append(out[0, -1].float().clone()))
        try:
            answer()
        finally:
            hook.remove()
        return seen[0]

    chatted = load_run(run, task="causal_lm", precision="auto")
    asked = [{"role": "user", "content": "Echo red"}]
    chat_logits = first_logits(chatted.model, lambda: generate(chatted.model, chatted.tokenizer, asked, 4,
                                                               chatted.stop_ids))
    served = load_served([str(run)])
    engine = Engine(max_batch=1, gather_s=0)
    try:
        serve_logits = first_logits(served[run.name].base.model,
                                    lambda: run_together(engine, echo_jobs(served, ["red"], runs=(run.name,))))
    finally:
        engine.close()
    assert served[run.name].base.model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert torch.equal(serve_logits, chat_logits), (serve_logits - chat_logits).abs().max()


def test_a_bf16_full_fine_tune_holds_its_linear_weights_in_bf16_and_computes_as_training_did(train_tiny, cpu_like):
    """A full run's weights are trained in fp32 under bf16 autocast, which casts each linear weight to bf16 at every
    forward: chat and serve hold those weights in bf16 instead (less memory, no cast each time), the rest in fp32,
    and compute the very logits training's autocast does from the fp32 weights."""
    import torch
    from transformers import AutoModelForCausalLM

    from loraforge.eval.generate import prompt_ids
    from loraforge.serve.models import load_served
    from loraforge.trained import load_run

    config, _ = train_tiny("adapter=full", "precision=bf16", "train.learning_rate=0.01")
    run = Path(config.output_dir)
    cpu_like(NATIVE_BF16)
    chatted = load_run(run, task="causal_lm", precision="auto")
    served = load_served([str(run)])[run.name].base.model
    for model in (chatted.model, served):
        head = model.get_output_embeddings()
        assert {m.weight.dtype for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head} == {
            torch.bfloat16}
        assert head.weight is model.get_input_embeddings().weight, "tied: the embeddings' weight, in fp32"
        assert head.weight.dtype == model.model.norm.weight.dtype == torch.float32
    ids = torch.tensor([prompt_ids(chatted.tokenizer, [{"role": "user", "content": "Echo red"}])])
    trained = AutoModelForCausalLM.from_pretrained(run / "model", dtype=torch.float32).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = trained(input_ids=ids).logits.float()
    with torch.no_grad():
        assert torch.equal(chatted.model(input_ids=ids).logits, expected)
        assert torch.equal(served(input_ids=ids).logits, expected)


def test_every_run_is_checked_before_any_model_loads(runs, tmp_path, monkeypatch):
    """A classification run, or a second run of one name, given last was refused only once the runs before it had
    loaded (minutes for a large base); the message on a name given twice named a folder that was not given."""
    import shutil

    from loraforge.errors import RunDirError
    from loraforge.serve import models
    from loraforge.serve.models import load_served

    monkeypatch.setattr(models, "load_trained_model", lambda *a, **k: pytest.fail("a model loaded"))
    classifier = shutil.copytree(runs[0], tmp_path / "classifier")
    resolved = classifier / "resolved.yaml"
    resolved.write_text(resolved.read_text().replace("task: causal_lm", "task: classification")
                        .replace("format: messages", "format: classification"))
    with pytest.raises(RunDirError, match=f"{classifier} is a classification run; serve answers chats"):
        load_served([str(runs[0]), str(classifier)])
    again = shutil.copytree(runs[0], tmp_path / "elsewhere" / runs[0].name)
    with pytest.raises(RunDirError) as refused:
        load_served([str(runs[0]), str(again)])
    assert str(refused.value).startswith(f"two runs are named {runs[0].name!r} ({runs[0]} and {again});")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_ends_the_requests_in_flight_and_the_server_says_so(runs, sig, code):
    """serve stopped by Ctrl-C or SIGTERM answered every request in flight in full first (up to --timeout each),
    then exited 0 without a word (a second Ctrl-C gave tracebacks)."""
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "loraforge", "serve", str(runs[0]), "--host", "127.0.0.1",
                               "--port", str(port), "--engine", "hf"], stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "LORAFORGE_API_KEY": KEY})
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        body = {"model": runs[0].name, "max_tokens": 900, "stream": True, "temperature": 1.0, "seed": 1,
                "messages": [{"role": "user", "content": "hi"}]}
        chunks, began = [], time.monotonic()
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {KEY}"}) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                chunks.append(line)
                if len(chunks) == 5:
                    server.send_signal(sig)
        _, err = server.communicate(timeout=60)
    finally:
        server.kill()
    assert server.returncode == code, err[-2000:]
    assert err.strip().splitlines()[-1] == (f"error: stopped by {sig.name}: 1 request(s) in flight were ended where "
                                            "they were")
    assert time.monotonic() - began < 30 and "Traceback" not in err
    assert len([c for c in chunks if c.startswith("data: {")]) < 200, "the answer ended, not generated to its end"

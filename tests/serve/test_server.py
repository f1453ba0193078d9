"""The server against the official ``openai`` client on loopback: a tiny Llama base plus two LoRA adapters."""

from __future__ import annotations

import socket
import threading
import time

import httpx2 as httpx  # the HTTP library the openai client itself uses
import openai
import pytest
import torch
from loopback import running
from tiny_lm import make_tokenizer, save_tiny, tiny_llama, tiny_t5

from lmcycle.adapt.lora import LoraConfig, add_lora, lora_layers, save_lora
from lmcycle.artifacts import load_adapted, load_model
from lmcycle.models.generate import DecodingConfig, generate
from lmcycle.serve.app import create_app

KEY = "sk-test-123"
PROMPTS = ["the cat sees", "red green", "the dog sees the moon and"]


def _adapter(base_dir, out_dir, seed: int) -> str:
    model, _ = load_model(base_dir)
    add_lora(model, LoraConfig(r=4, alpha=8))
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B["default"].weight.normal_(0, 2.0)  # B != 0: the adapter changes the outputs
    return str(save_lora(model, "default", out_dir, base_model_name_or_path=base_dir))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    tok = make_tokenizer()
    base = save_tiny(tiny_llama(tok), tok, root / "base")
    adapters = {"ad1": _adapter(base, root / "ad1", 1), "ad2": _adapter(base, root / "ad2", 2)}
    app = create_app(base, adapters, api_key=KEY, batch_wait_s=0.05)
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        yield {"url": url, "client": client, "base": base, "adapters": adapters, "app": app}


def _in_process(path, prompts, max_tokens, adapter=None):
    model, tok = load_adapted(adapter, path) if adapter else load_model(path)
    return generate(model, tok, prompts, DecodingConfig(max_new_tokens=max_tokens))


def test_an_encoder_decoder_with_mixed_adapters_serves_what_generate_gives(tmp_path):
    tok = make_tokenizer(seq2seq=True)
    base = save_tiny(tiny_t5(tok), tok, tmp_path / "t5")
    adapters = {"t5ad": _adapter(base, tmp_path / "t5ad", 3)}
    want = {name: _in_process(base, PROMPTS, 6, adapters.get(name)) for name in ("t5", "t5ad")}
    assert want["t5"] != want["t5ad"]
    app = create_app(base, adapters, batch_wait_s=0.1)
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        got: dict = {}

        def call(name, i):
            got[(name, i)] = client.completions.create(model=name, prompt=PROMPTS[i], max_tokens=6,
                                                       temperature=0).choices[0].text

        threads = [threading.Thread(target=call, args=(n, i)) for n in want for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert got == {(n, i): want[n][i] for n in want for i in range(len(PROMPTS))}


def test_models_lists_base_and_adapters(served):
    ids = [m.id for m in served["client"].models.list()]
    assert ids == ["base", "ad1", "ad2"]


def test_completion_equals_in_process_generate_for_base_and_adapters(served):
    c = served["client"]
    for name, adapter in (("base", None), *served["adapters"].items()):
        want = _in_process(served["base"], PROMPTS, 8, adapter)
        got = [c.completions.create(model=name, prompt=p, max_tokens=8, temperature=0).choices[0].text
               for p in PROMPTS]
        assert got == want, name
    base = _in_process(served["base"], PROMPTS, 8)
    assert base != _in_process(served["base"], PROMPTS, 8, served["adapters"]["ad1"])


def test_concurrent_mixed_adapter_requests_are_batched_and_correct(served):
    c, engine = served["client"], served["app"].state.engine
    want = {name: _in_process(served["base"], PROMPTS, 6, ad) for name, ad in
            (("base", None), *served["adapters"].items())}
    jobs = [(name, i) for name in want for i in range(len(PROMPTS))]
    results: dict = {}

    def call(name, i):
        r = c.completions.create(model=name, prompt=PROMPTS[i], max_tokens=6, temperature=0)
        results[(name, i)] = r.choices[0].text

    before = engine.batches_run
    threads = [threading.Thread(target=call, args=j) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {j: want[j[0]][j[1]] for j in jobs} == results
    assert engine.batches_run - before < len(jobs)  # some requests shared a forward pass


def test_usage_and_finish_reason(served):
    r = served["client"].completions.create(model="base", prompt="the cat sees", max_tokens=5, temperature=0)
    tok = make_tokenizer()
    prompt_tokens = len(tok("the cat sees")["input_ids"])
    assert r.usage.prompt_tokens == prompt_tokens
    assert r.usage.total_tokens == prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason in ("stop", "length")
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == 5


def test_seeded_sampling_n_choices_match_generate(served):
    r = served["client"].completions.create(model="ad1", prompt="the cat sees", max_tokens=6, temperature=0.9,
                                            top_p=0.95, seed=7, n=3)
    model, tok = load_adapted(served["adapters"]["ad1"], served["base"])
    want = generate(model, tok, ["the cat sees"] * 3,
                    DecodingConfig(do_sample=True, temperature=0.9, top_p=0.95, max_new_tokens=6, seed=7))
    assert [ch.text for ch in sorted(r.choices, key=lambda ch: ch.index)] == want


def test_chat_uses_fallback_template(served):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat"}]
    r = served["client"].chat.completions.create(model="ad2", messages=msgs, max_tokens=6, temperature=0)
    prompt = "system: be brief\nuser: the cat\nassistant:"
    assert r.choices[0].message.content == _in_process(served["base"], [prompt], 6, served["adapters"]["ad2"])[0]
    assert r.choices[0].message.role == "assistant"


def test_streaming_completion_and_chat_join_to_the_full_text(served):
    c = served["client"]
    full = c.completions.create(model="ad1", prompt="the dog", max_tokens=8, temperature=0).choices[0].text
    chunks = list(c.completions.create(model="ad1", prompt="the dog", max_tokens=8, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == full
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    msgs = [{"role": "user", "content": "the dog"}]
    full = c.chat.completions.create(model="base", messages=msgs, max_tokens=8, temperature=0)
    chunks = list(c.chat.completions.create(model="base", messages=msgs, max_tokens=8, temperature=0, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == full.choices[0].message.content


def _post(served, path, **kw):
    headers = {"Authorization": f"Bearer {KEY}", **kw.pop("headers", {})}
    return httpx.post(served["url"] + path, headers=headers, timeout=30, **kw)


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    ({"model": "nope", "prompt": "x"}, 404, "model"),
    ({"model": "base", "prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
    ({"model": "base", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"model": "base", "prompt": ["a", 3]}, 400, "prompt"),
    ({"model": "base", "prompt": "the cat sees " * 100}, 400, "prompt"),
    ({"model": "base", "prompt": "x", "max_tokens": 500}, 400, "max_tokens"),
    ({"model": "base", "prompt": "x" * 2_000_000}, 413, None),
    # the issue's 438-byte request, 60 prompts x n 16 x 240 tokens, held the engine for a minute
    ({"model": "base", "prompt": ["the cat"] * 60, "n": 16, "max_tokens": 240}, 400, "n"),
    ({"model": "base", "prompt": ["x"] * 300, "max_tokens": 1}, 400, "n"),  # more sequences than the queue
    (b'{"model": "base", "prompt": "the \\ud800 cat"}', 400, "prompt"),  # a lone surrogate: not text
    (b'{"model": "base", "prompt": ["ok", "\\udc00"]}', 400, "prompt.1"),
    (b'{"model": "base", "prompt": "x", "stop": ["\\ud800"]}', 400, "stop.0"),
    (b'{"model": "b\\ud800", "prompt": "x"}', 400, "model"),
    ({"model": "base", "prompt": "x", "logprobs": 6}, 400, "logprobs"),  # 0 to 5 alternatives
    ({"model": "base", "prompt": "x", "top_logprobs": 2}, 400, "top_logprobs"),  # chat's field, not completions'
    ({"model": "base", "prompt": "x", "best_of": 3}, 400, "best_of"),
    ({"model": "base", "prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
])
def test_bad_input_gets_openai_error_and_server_keeps_serving(served, body, status, param):
    r = _post(served, "/v1/completions", content=body, headers={"Content-Type": "application/json"}) \
        if isinstance(body, bytes) else _post(served, "/v1/completions", json=body)
    assert r.status_code == status
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param or (param and err["param"].startswith(param))
    ok = served["client"].completions.create(model="base", prompt="the cat", max_tokens=2, temperature=0)
    assert ok.choices


def test_oversized_chunked_body_without_content_length_gets_413(served):
    def chunks():  # a generator body is sent chunked: the size is only known by reading it
        yield b'{"model": "base", "prompt": "'
        for _ in range(40):
            yield b"x" * 50_000
        yield b'"}'

    r = _post(served, "/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    ok = _post(served, "/v1/completions", content=iter([b'{"model": "base", ', b'"prompt": "the", "max_tokens": 2}']),
               headers={"Content-Type": "application/json"})
    assert ok.status_code == 200 and ok.json()["choices"]


def test_client_sees_not_found_error_for_unknown_model(served):
    with pytest.raises(openai.NotFoundError):
        served["client"].completions.create(model="missing", prompt="x", max_tokens=2)


def test_api_key_required_and_nothing_leaks(served):
    bad = openai.OpenAI(base_url=served["url"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    for path in ("/v1/models", "/v1/completions"):
        r = httpx.request("GET" if "models" in path else "POST", served["url"] + path, json={"model": "ad1"})
        assert r.status_code == 401
        assert "ad1" not in r.text and "base" not in r.text
        assert r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(served["url"] + "/health").json() == {"status": "ok"}


def test_cli_serve_rejects_a_malformed_adapter_option(served, capsys):
    from lmcycle.cli import main

    assert main(["serve", "--model", served["base"], "--adapter", "no-equals-sign"]) == 1
    assert "NAME=DIR" in capsys.readouterr().err
    assert main(["serve", "--model", served["base"], "--max-batch", "0"]) == 1
    assert "max_batch must be at least 1" in capsys.readouterr().err
    assert main(["serve", "--model", served["base"], "--max-request-tokens", "0"]) == 1
    assert "max_request_tokens must be at least 1" in capsys.readouterr().err


def test_streaming_with_stop_strings_and_n_matches_the_full_response(served):
    c = served["client"]
    kw = dict(model="ad2", prompt="the cat sees", max_tokens=12, temperature=0.8, seed=3, n=2)
    full = c.completions.create(**kw)
    stops = [full.choices[0].text[3:5]] if len(full.choices[0].text) > 5 else ["e"]
    full = c.completions.create(**kw, stop=stops)
    pieces = {0: "", 1: ""}
    finish = {}
    for chunk in c.completions.create(**kw, stop=stops, stream=True):
        ch = chunk.choices[0]
        pieces[ch.index] += ch.text
        if ch.finish_reason:
            finish[ch.index] = ch.finish_reason
    assert pieces == {ch.index: ch.text for ch in full.choices}
    assert finish == {ch.index: ch.finish_reason for ch in full.choices}
    assert all(s not in t for s in stops for t in pieces.values())


def _engine_job(engine, prompt, max_tokens, **kw):
    from lmcycle.serve.engine import Job

    ids = engine.tokenizer(prompt)["input_ids"]
    return Job(ids=ids, n=1, adapter=None, cfg=DecodingConfig(max_new_tokens=max_tokens), **kw)


def test_a_mixed_adapter_batch_is_one_decode_with_each_rows_adapter(served):
    engine = served["app"].state.engine
    names = [None, "ad1", "ad2", "ad1", None]
    want = {name: _in_process(served["base"], PROMPTS[:1], 6, served["adapters"].get(name)) for name in set(names)}
    assert len(set(map(tuple, want.values()))) == 3  # the three models really differ on this prompt
    started, gate = threading.Event(), threading.Event()
    blocker = engine.submit(_engine_job(engine, "the", 1, on_token=lambda j, t: started.set() or gate.wait(30)))
    assert started.wait(timeout=30)  # the worker is inside the blocker's decode: the next jobs wait together
    jobs = [_engine_job(engine, PROMPTS[0], 6) for _ in names]
    for job, name in zip(jobs, names, strict=True):
        job.adapter = name
        engine.submit(job)
    before = engine.batches_run
    gate.set()  # the worker finishes the blocker and then finds all five waiting: one batch
    blocker.result(timeout=30)
    got = [job.future.result(timeout=30)[0].text for job in jobs]
    assert got == [want[name][0] for name in names]
    assert engine.batches_run - before == 2  # the blocker's decode, then one for all five


def test_cancelling_a_job_stops_its_decoding(served):
    engine = served["app"].state.engine
    full = engine.submit(_engine_job(engine, "the", 40)).result(timeout=30)[0]
    assert len(full.ids) > 3  # the uncancelled run goes on (the check below could fail)
    job = _engine_job(engine, "the", 40)
    job.on_token = lambda j, token: job.cancelled.set() if len(seen) >= 1 else seen.append(token)
    seen: list[int] = []
    partial = engine.submit(job).result(timeout=30)[0]
    assert partial.ids == full.ids[:2]


def test_full_queue_answers_429_and_slow_requests_503(served):
    app = create_app(served["base"], max_queue=2, request_timeout_s=0.3)
    engine = app.state.engine
    started, release = threading.Event(), threading.Event()

    def block(j, token):
        started.set()
        release.wait(timeout=30)

    busy = engine.submit(_engine_job(engine, "the", 3, on_token=block))
    assert started.wait(timeout=30)  # the worker is now stuck inside a decode step
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
        with pytest.raises(openai.InternalServerError) as slow:  # waits in the queue past its timeout
            client.completions.create(model="base", prompt="x", max_tokens=2)
        assert slow.value.status_code == 503 and slow.value.body["code"] == "timeout"
        assert engine.waiting() == 0  # the timed-out request gave its place back
        waiting = _engine_job(engine, "the", 2)
        waiting.n = 2
        engine.submit(waiting)  # the queue counts sequences: these two choices fill it
        with pytest.raises(openai.RateLimitError) as full:
            client.completions.create(model="base", prompt="x", max_tokens=2)
        assert full.value.body["code"] == "queue_full"
        with pytest.raises(openai.BadRequestError) as never:  # could never fit: 400, not "retry later"
            client.completions.create(model="base", prompt="x", max_tokens=2, n=3)
        assert never.value.body["code"] == "request_too_large"
        release.set()
        busy.result(timeout=30)
        assert len(waiting.future.result(timeout=30)) == 2
        ok = client.completions.create(model="base", prompt="x", max_tokens=2, temperature=0)
        assert ok.choices[0].finish_reason in ("stop", "length")


def test_streaming_client_that_leaves_cancels_its_request(served):
    engine = served["app"].state.engine
    slow = engine.model.register_forward_pre_hook(lambda *_: time.sleep(0.02))  # ~2 s for 100 tokens
    try:
        before = engine.cancelled_jobs
        body = {"model": "base", "prompt": "the", "max_tokens": 100, "temperature": 0, "stream": True}
        with httpx.stream("POST", served["url"] + "/v1/completions", json=body, timeout=30,
                          headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # one event, then hang up
        for _ in range(200):
            if engine.cancelled_jobs > before:
                break
            time.sleep(0.02)
        assert engine.cancelled_jobs == before + 1
    finally:
        slow.remove()


def test_chat_prompt_uses_the_tokenizers_template_when_it_has_one():
    from lmcycle.serve.app import chat_prompt

    tok = make_tokenizer()
    msgs = [{"role": "user", "content": "hi"}]
    assert chat_prompt(tok, msgs) == "user: hi\nassistant:"
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    assert chat_prompt(tok, msgs) == "<user>hi<assistant>"


def test_stream_usage_and_model_retrieve(served):
    c = served["client"]
    full = c.completions.create(model="ad1", prompt="the cat", max_tokens=6, temperature=0)
    chunks = list(c.completions.create(model="ad1", prompt="the cat", max_tokens=6, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    assert c.models.retrieve("ad2").id == "ad2"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("nope")


def test_a_list_of_prompts_samples_like_generate_over_the_list(served):
    r = served["client"].completions.create(model="base", prompt=PROMPTS[:2], max_tokens=5, temperature=1.2,
                                            seed=11, n=2, extra_body={"top_k": 20})
    model, tok = load_model(served["base"])
    want = generate(model, tok, [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2,
                    DecodingConfig(do_sample=True, temperature=1.2, top_k=20, max_new_tokens=5, seed=11))
    assert [ch.text for ch in sorted(r.choices, key=lambda ch: ch.index)] == want
    assert r.usage.prompt_tokens == sum(len(tok(p)["input_ids"]) for p in PROMPTS[:2])


def test_a_small_request_behind_a_huge_one_is_not_starved(served):
    """A request of 32 sequences x 40 tokens at 4 sequences a batch takes 8 batches; one sent after it started
    gets into the next batch and is answered long before the big one, which still samples as generate does."""
    app = create_app(served["base"], max_batch=4, batch_wait_s=0.01)
    engine = app.state.engine
    decoding = threading.Event()
    slow = engine.model.register_forward_pre_hook(lambda *_: decoding.set() or time.sleep(0.01))  # ~3 s for big
    prompts = ["the cat", "red", "the dog sees", "green", "moon", "the", "sees the", "cat"]
    big_kw = dict(model="base", prompt=prompts, n=4, max_tokens=40, temperature=1.0, seed=5)
    done: dict = {}
    try:
        with running(app) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)

            def big():
                done["big"] = client.completions.create(**big_kw)
                done["big_at"] = time.monotonic()

            thread = threading.Thread(target=big)
            thread.start()
            assert decoding.wait(timeout=30)  # the worker is inside the big request's first batch
            small = client.completions.create(model="base", prompt="the cat", max_tokens=2, temperature=0)
            small_at = time.monotonic()
            thread.join(timeout=60)
    finally:
        slow.remove()
    assert small.choices[0].finish_reason in ("stop", "length")
    assert done["big_at"] - small_at > 1.0  # before: the small one waited for all eight batches
    model, tok = load_model(served["base"])
    want = generate(model, tok, [p for p in prompts for _ in range(4)],
                    DecodingConfig(do_sample=True, temperature=1.0, max_new_tokens=40, seed=5))
    assert [ch.text for ch in sorted(done["big"].choices, key=lambda ch: ch.index)] == want


def test_a_tiny_temperature_decodes_greedily_instead_of_failing(served):
    c = served["client"]
    greedy = c.completions.create(model="ad1", prompt="the cat sees", max_tokens=8, temperature=0).choices[0].text
    for t in (1e-300, 1e-6):  # logits / 1e-300 overflow to inf, softmax to NaN: was a 500
        r = c.completions.create(model="ad1", prompt="the cat sees", max_tokens=8, temperature=t, seed=1)
        assert r.choices[0].text == greedy


def test_harmless_values_of_unsupported_fields_pass_and_chat_refuses_the_rest(served):
    ok = _post(served, "/v1/completions", json={"model": "base", "prompt": "the", "max_tokens": 2, "logprobs": None,
                                                "echo": False, "best_of": 1, "presence_penalty": 0,
                                                "frequency_penalty": 0.0, "logit_bias": {}, "user": "u1"})
    assert ok.status_code == 200 and ok.json()["choices"]
    msgs = [{"role": "user", "content": "the cat"}]
    ok = _post(served, "/v1/chat/completions", json={"model": "base", "messages": msgs, "max_tokens": 2,
                                                     "logprobs": False, "top_logprobs": 0, "echo": False})
    assert ok.status_code == 200 and ok.json()["choices"][0]["logprobs"] is None
    for extra, param in (({"echo": True}, "echo"), ({"logit_bias": {"5": 1}}, "logit_bias"),
                         ({"response_format": {"type": "json_object"}}, "response_format")):
        r = _post(served, "/v1/chat/completions", json={"model": "base", "messages": msgs, **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param
        assert r.json()["error"]["code"] == "unsupported_parameter"
    r = _post(served, "/v1/chat/completions", content=b'{"model": "base", "messages": [{"role": "user", '
              b'"content": "hi \\udfff"}]}', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content"
    assert "surrogate" in r.json()["error"]["message"]


def test_chat_without_max_tokens_stays_within_the_request_budget(served):
    app = create_app(served["base"], max_request_tokens=12)
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        r = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "the cat"}],
                                           n=3, temperature=1.0, seed=2)
        assert r.usage.completion_tokens <= 12  # 12 // 3 each, not the rest of the 128-token window
        assert any(ch.finish_reason == "length" for ch in r.choices)
        with pytest.raises(openai.BadRequestError) as big:
            client.completions.create(model="base", prompt="the", n=2, max_tokens=7)
        assert big.value.body["code"] == "request_too_large" and big.value.body["param"] == "max_tokens"
        assert "is 14 new tokens" in big.value.body["message"]


def test_too_many_or_too_large_headers_get_431_and_uvicorn_bounds_the_head(served):
    from lmcycle.serve.app import uvicorn_options

    app = create_app(served["base"], max_headers=20, max_header_bytes=4096)
    body = {"model": "base", "prompt": "the", "max_tokens": 2}
    with running(app, **uvicorn_options(4096)) as url:
        many = {f"x-h{i}": "v" for i in range(30)}
        for headers in (many, {"x-big": "v" * 5000}):
            r = httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=30)
            assert r.status_code == 431 and r.json()["error"]["code"] == "headers_too_large"
        # A head that never ends: past the option's bound (not h11's default 16 KiB) uvicorn stops buffering it
        # and answers 400 itself instead of waiting for more.
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nx-big: " + b"v" * 14_000)
            assert conn.recv(64).startswith(b"HTTP/1.1 400")
        assert httpx.post(url + "/v1/completions", json=body, timeout=30).status_code == 200

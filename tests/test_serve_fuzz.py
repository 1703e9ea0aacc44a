"""Requests from strangers: random JSON bodies against every POST endpoint of the server, in
process (Starlette's test client). Every answer is a 200, or an OpenAI error object with a 4xx
status: never a 500, never a traceback, and the engine keeps serving."""

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lmzoo
from lmzoo.serve.api import Limits, Server, build_app
from lmzoo.serve.engine import Engine

FIELDS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "seed", "stop", "n", "logprobs", "top_logprobs", "echo", "stream", "stream_options", "response_format",
          "tools", "tokens", "suffix", "add_generation_prompt", "add_special_tokens"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=True),
                    st.text(max_size=20), st.sampled_from(["base", "user", "assistant", "text", "hi"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(["role", "content", "type", "text",
                                                                   "include_usage"]), inner, max_size=3)),
    max_leaves=8)
# values a real client might send (so that many requests get through to the engine), and anything
plausible = st.one_of(st.integers(-1, 6), st.floats(0, 2), st.sampled_from([float("nan"), float("inf")]), st.booleans(),
                      st.just("base"), st.just(["lo", "and"]),
                      st.just({"type": "text"}), st.just({"include_usage": True}), st.just([1, 2, 3]),
                      st.just([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]))
VALID = {"/v1/chat/completions": {"model": "base", "messages": [{"role": "user", "content": "Hi"}]},
         "/v1/completions": {"model": "base", "prompt": "Hi"}, "/tokenize": {"prompt": "Hi"},
         "/detokenize": {"tokens": [1, 2, 3]}}


@st.composite
def requests(draw):
    """(path, body): the endpoint's valid body with up to 3 fields replaced, or anything at all."""
    path = draw(st.sampled_from(sorted(VALID)))
    extra = draw(st.dictionaries(st.sampled_from(FIELDS), st.one_of(plausible, plausible, values), max_size=3))
    base = VALID[path] if draw(st.integers(0, 9)) else {}
    return path, {**base, **extra}


@pytest.fixture(scope="module")
def client():
    from starlette.testclient import TestClient

    def load():
        model, tokenizer = lmzoo.load()
        return Engine({"base": lmzoo.prepare_for_inference(model)}, {}, max_batch=2, max_context=256).start(), \
            tokenizer

    server = Server(load, limits=Limits(max_tokens=3, max_body_bytes=4096))
    with TestClient(build_app(server), raise_server_exceptions=False) as c:
        for _ in range(600):
            if c.get("/health").status_code == 200:
                break
            import time

            time.sleep(0.1)
        yield c
    server.engine.stop()


@settings(max_examples=int(os.environ.get("LMZOO_SERVE_FUZZ", "120")), deadline=None,
          derandomize="LMZOO_SERVE_FUZZ" not in os.environ,  # the same cases in CI; make fuzz explores
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(request=requests(), raw=st.one_of(st.none(), st.none(), st.binary(max_size=64)))
def test_random_bodies_get_a_200_or_one_clear_error(client, request, raw):
    path, body = request
    content = raw if raw is not None else json.dumps(body, allow_nan=True).encode()
    r = client.post(path, content=content, headers={"content-type": "application/json"})
    assert r.status_code in (200, 400, 404, 413), (r.status_code, r.text[:300])
    assert "Traceback" not in r.text
    if r.status_code != 200:
        error = r.json()["error"]
        assert isinstance(error["message"], str) and error["message"] and set(error) == {"message", "type", "param",
                                                                                        "code"}
    elif body.get("stream") is True and path.startswith("/v1/"):
        assert r.text.rstrip().endswith("data: [DONE]")


def test_the_engine_still_answers_after_the_fuzzing(client):
    r = client.post("/v1/completions", json={"model": "base", "prompt": "Hello", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_nan_and_infinite_numbers_are_refused_not_sampled(client):
    """A NaN temperature would reach the sampler and fail every row of the batch: refused first."""
    for field, value in (("temperature", "NaN"), ("top_p", "NaN"), ("temperature", "Infinity")):
        body = f'{{"model": "base", "prompt": "Hi", "max_tokens": 2, "{field}": {value}}}'
        r = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == field


def test_inputs_that_once_failed_the_whole_batch_are_refused_or_served(client):
    """Each of these once crashed the engine thread (failing every request in flight) or hung:
    a seed past 64 bits, a temperature so small that logits / t overflow, an empty prompt, token
    ids given as booleans. Now: a 400 naming the field, or a normal answer."""
    h = {"content-type": "application/json"}
    for body, status, param in (
            ({"prompt": "Hi", "seed": 2 ** 64, "temperature": 1}, 400, "seed"),
            ({"prompt": "Hi", "seed": 2 ** 63 - 1, "n": 2, "temperature": 1}, 400, "seed"),
            ({"prompt": "Hi", "temperature": 1e-300}, 200, None),
            ({"prompt": ""}, 400, "prompt"), ({"prompt": [""]}, 400, "prompt"),
            ({"prompt": [[True, False]]}, 400, "prompt"),
            ({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 0}, 400, "max_tokens")):
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        r = client.post(path, content=json.dumps({"model": "base", "max_tokens": 2, **body}), headers=h)
        assert r.status_code == status, (body, r.text)
        if param:
            assert r.json()["error"]["param"] == param, (body, r.text)
    usage = [client.post("/v1/completions", json={"model": "base", "prompt": "Hi there", "max_tokens": 2, "n": n})
             .json()["usage"]["prompt_tokens"] for n in (1, 2)]
    assert usage[0] == usage[1] > 0  # the prompt counts once, as OpenAI counts it, whatever n is

"""The serving engine in-process, on a tiny model: rows that join, leave, get compacted and share
the batch with a long prefill still decode exactly as generate() does alone."""

import queue
import threading
import time

import pytest
import torch

import lmzoo
from lmzoo.serve.engine import PREFILL_CHUNK, Engine, Request

TINY = dict(vocab_size=97, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=1024, init_std=0.3)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return lmzoo.prepare_for_inference(lmzoo.from_config(lmzoo.preset("classic").replace(**TINY)))


def run(engine, req):
    """Submit; return a queue that the request's events arrive on."""
    events = queue.Queue()
    req.emit = events.put
    engine.submit(req)
    return events


def tokens_of(events):
    out = []
    while True:
        ev = events.get(timeout=60)
        if ev[0] == "token":
            out.append(ev[1])
        elif ev[0] == "done":
            return out, ev[1]
        else:
            raise AssertionError(ev)


def alone(model, prompt, n):
    return model.generate([prompt], max_new_tokens=n)[0][len(prompt):]


def test_rows_that_join_leave_and_get_compacted_decode_as_if_alone(model):
    # a context of 64 and 8 spare slots: the joins' gaps force many compactions
    engine = Engine({"m": model}, {}, max_batch=3, max_context=64, spare_slots=8).start()
    compactions = []
    real = engine._compact
    engine._compact = lambda batch: compactions.append(batch.cache.length) or real(batch)
    try:
        gen = torch.Generator().manual_seed(1)
        jobs = []
        for _ in range(14):
            prompt = torch.randint(0, 97, (int(torch.randint(3, 40, (1,), generator=gen)),), generator=gen).tolist()
            n = int(torch.randint(1, 20, (1,), generator=gen))
            jobs.append((prompt, n, run(engine, Request(prompt=prompt, model="m", max_tokens=n))))
        for prompt, n, events in jobs:
            got, why = tokens_of(events)
            assert why == "length" and got == alone(model, prompt, n)
    finally:
        engine.stop()
    assert compactions and engine.running() == 0


def test_a_long_prefill_is_chunked_between_decode_steps(model):
    steps, lock = [], threading.Lock()

    def on_step(kind, n):
        with lock:
            steps.append(kind)

    engine = Engine({"m": model}, {}, max_batch=2, max_context=900, on_step=on_step).start()
    try:
        short = run(engine, Request(prompt=[1, 2, 3], model="m", max_tokens=60))
        assert short.get(timeout=60)[0] == "token"  # the short request is decoding
        long_prompt = torch.randint(0, 97, (5 * PREFILL_CHUNK,)).tolist()
        long = run(engine, Request(prompt=long_prompt, model="m", max_tokens=2))
        assert tokens_of(long)[0] == alone(model, long_prompt, 2)
        tokens_of(short)
    finally:
        engine.stop()
    chunks = [i for i, kind in enumerate(steps) if kind == "prefill"][1:]  # the long prompt's 5 chunks
    assert len(chunks) == 5
    between = steps[chunks[0]:chunks[-1]]
    assert between.count("decode") >= 4  # a decode step after each chunk: the stream never waited for all 5


def test_cancelled_and_stopped_rows_leave_the_batch(model):
    engine = Engine({"m": model}, {}, max_batch=2, max_context=200).start()
    try:
        prompt = [5, 6, 7]
        first = alone(model, prompt, 8)
        stop = Request(prompt=prompt, model="m", max_tokens=8, stop_ids=frozenset({first[3]}))
        got, why = tokens_of(run(engine, stop))
        assert why == "stop" and got == first[:first.index(first[3])]
        req = Request(prompt=prompt, model="m", max_tokens=500)
        events = run(engine, req)
        events.get(timeout=60)
        req.cancelled.set()
        while events.get(timeout=60)[0] != "done":
            pass
        for _ in range(600):  # "done" goes out just before the row is removed, in the same step
            if engine.running() == 0:
                break
            time.sleep(0.01)
        assert engine.running() == 0
    finally:
        engine.stop()


def test_models_the_batch_cannot_serve_are_refused_with_the_reason(model):
    for change, words in (({"lm_type": "prefix"}, "prefix LM"), ({"attention_pattern": "strided"}, "attention_pattern"),
                          ({"sliding_window": 128}, "--max-context")):
        m = lmzoo.from_config(model.config.replace(**change))
        with pytest.raises(lmzoo.LmzooError, match=words):
            Engine({"m": m}, {}, max_context=512)


def test_compaction_moves_a_row_with_a_gap_under_a_longer_one(model):
    """Row A starts at slot 0; B's longer prompt pushes the batch's slot past A's, leaving A a gap;
    C keeps a long row running when the slots run out: compaction packs A to end where C ends, far
    right of A's first slots, which must then be hidden."""
    engine = Engine({"m": model}, {}, max_batch=3, max_context=100, spare_slots=8).start()
    compactions = []
    real = engine._compact
    engine._compact = lambda batch: compactions.append(batch.cache.length) or real(batch)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (3, 60, 70)]
    try:
        a = run(engine, Request(prompt=prompts[0], model="m", max_tokens=90))
        got_a = [a.get(timeout=60)[1], a.get(timeout=60)[1]]
        b = run(engine, Request(prompt=prompts[1], model="m", max_tokens=30))
        got_b = tokens_of(b)[0]
        c = run(engine, Request(prompt=prompts[2], model="m", max_tokens=30))
        got_a += tokens_of(a)[0]
        got_c = tokens_of(c)[0]
    finally:
        engine.stop()
    assert compactions
    assert got_a == alone(model, prompts[0], 90)
    assert got_b == alone(model, prompts[1], 30) and got_c == alone(model, prompts[2], 30)


def test_an_error_in_one_request_reaches_it_and_the_engine_goes_on(model):
    """The API refuses a NaN temperature; if something like it reached the sampler anyway, the
    request must get an error event (not wait forever), and the next request must be served."""
    engine = Engine({"m": model}, {}, max_batch=2, max_context=100).start()
    try:
        bad = run(engine, Request(prompt=[1, 2, 3], model="m", max_tokens=3, temperature=float("nan")))
        assert bad.get(timeout=60)[0] == "error"
        good, why = tokens_of(run(engine, Request(prompt=[1, 2, 3], model="m", max_tokens=3)))
        assert why == "length" and good == alone(model, [1, 2, 3], 3)
    finally:
        engine.stop()


def test_a_failed_load_is_reported_not_loading_forever():
    from starlette.testclient import TestClient

    from lmzoo.serve.api import Server, build_app

    def load():
        raise RuntimeError("out of memory")

    server = Server(load)
    with TestClient(build_app(server)) as c:
        for _ in range(100):
            if server.error:
                break
            time.sleep(0.01)
        r = c.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "error" and "out of memory" in r.json()["message"]
        r = c.post("/v1/completions", json={"model": "m", "prompt": "Hi"})
        assert r.status_code == 503 and "out of memory" in r.json()["error"]["message"]


def test_health_is_503_while_loading_then_200():
    from starlette.testclient import TestClient

    from lmzoo.serve.api import Server, build_app

    release = threading.Event()

    def load():
        release.wait(60)
        raise lmzoo.LmzooError("stopped on purpose")

    server = Server(load)
    with TestClient(build_app(server)) as c:
        r = c.get("/health")
        assert r.status_code == 503 and r.json() == {"status": "loading", "message": None}
        r = c.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "loading"
        release.set()
        for _ in range(100):
            if server.error:
                break
            time.sleep(0.01)
        assert c.get("/health").json() == {"status": "error", "message": "stopped on purpose"}

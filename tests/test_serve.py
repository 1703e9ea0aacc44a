"""`lmzoo serve` driven by the real `openai` client: a server in a subprocess on a free loopback
port, the embedded model, a LoRA and a P-tuning v2 adapter. Outputs are checked against lmzoo's
own generate() in this process (the same model and adapter), and against themselves alone."""

import asyncio
import os
import re
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch

import lmzoo
from lmzoo.peft import LoraConfig, PrefixConfig, PromptConfig, add_lora, add_virtual

KEY = "test-key"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Tell me a long story about a brave cat."}]  # longer than max_tokens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A LoRA (q, v; random B, so it changes the output), a P-tuning v2 and a prompt-tuning adapter for
    the embedded model."""
    root = tmp_path_factory.mktemp("adapters")
    torch.manual_seed(0)
    model, _ = lmzoo.load()
    add_lora(model, LoraConfig(r=4, targets=("q", "v")))
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            torch.nn.init.normal_(p, std=0.3)
    lmzoo.save_adapter(model, str(root / "lora"))
    model, _ = lmzoo.load()
    add_virtual(model, PrefixConfig(n_virtual=4))
    torch.nn.init.normal_(model.virtual.embedding.weight, std=0.3)
    lmzoo.save_adapter(model, str(root / "prefix"))
    model, _ = lmzoo.load()
    add_virtual(model, PromptConfig(n_virtual=3))
    torch.nn.init.normal_(model.virtual.embedding.weight, std=0.5)
    lmzoo.save_adapter(model, str(root / "prompt"))
    return {name: str(root / name) for name in ("lora", "prefix", "prompt")}


@pytest.fixture(scope="module")
def server(adapters):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmzoo", "serve", "--port", str(port), "--api-key", KEY, "--name", "base",
         "--adapter", f"lora={adapters['lora']}", "--adapter", f"prefix={adapters['prefix']}",
         "--adapter", f"prompt={adapters['prompt']}",
         "--max-batch", "4", "--max-queue", "6", "--max-tokens", "64", "--max-context", "512"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            r = httpx.get(url + "/health", timeout=2)
            if r.status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            pytest.fail(f"the server exited: {proc.stderr.read()}")
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("the server did not become ready in 180 s")
    yield {"url": url, "proc": proc}
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
    assert "Traceback" not in proc.stderr.read()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(adapters):
    """lmzoo's own greedy generation, in this process: what the server must reproduce."""
    models = {}
    tok = None
    for name, path in (("base", None), *adapters.items()):
        model, tok = lmzoo.load(adapter=path)
        models[name] = lmzoo.prepare_for_inference(model)

    def greedy(name, messages, n):
        ids = tok.encode_chat(messages, add_generation_prompt=True)
        out = models[name].generate([ids], max_new_tokens=n, stop_tokens=tok.stop_ids)[0][len(ids):]
        return tok.decode([t for t in out if t not in tok.stop_ids], skip_special_tokens=True)

    return {"greedy": greedy, "tokenizer": tok, "models": models}


def chat(client, model="base", messages=QUESTION, **kw):
    return client.chat.completions.create(model=model, messages=messages, **{"temperature": 0, "max_tokens": 12, **kw})


# ---------------------------------------------------------------------- endpoints

def test_health_models_tokenize_and_the_page(server, client):
    assert httpx.get(server["url"] + "/health").json() == {"status": "ok"}  # 503 while loading: test_serve_engine
    assert sorted(m.id for m in client.models.list().data) == ["base", "lora", "prefix", "prompt"]
    h = {"Authorization": f"Bearer {KEY}"}
    ids = httpx.post(server["url"] + "/tokenize", json={"prompt": "Hello world"}, headers=h).json()
    assert ids["count"] == len(ids["tokens"]) > 0
    back = httpx.post(server["url"] + "/detokenize", json={"tokens": ids["tokens"]}, headers=h).json()
    assert back["prompt"].endswith("Hello world")
    page = httpx.get(server["url"] + "/")
    assert page.status_code == 200 and "/v1/chat/completions" in page.text


def test_chat_equals_lmzoo_generate_for_base_and_each_adapter_side_by_side(client, reference):
    """A plain row, a P-tuning v2 row and a prompt-tuning row (one batch) and a LoRA row (its own
    batch) at once."""
    names = ("base", "prefix", "prompt", "lora")

    async def all_at_once():
        aclient = openai.AsyncOpenAI(base_url=client.base_url, api_key=KEY, max_retries=0)
        return await asyncio.gather(*(aclient.chat.completions.create(
            model=name, messages=STORY, temperature=0, max_tokens=12) for name in names))

    answers = asyncio.run(all_at_once())
    texts = {}
    for name, r in zip(names, answers, strict=True):
        assert r.model == name and r.object == "chat.completion" and r.id.startswith("chatcmpl-")
        texts[name] = r.choices[0].message.content
        assert texts[name] == reference["greedy"](name, STORY, 12), name
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        assert (r.usage.completion_tokens, r.choices[0].finish_reason) == (12, "length") or \
            r.usage.completion_tokens < 12 and r.choices[0].finish_reason == "stop"
    assert len(set(texts.values())) == 4  # each adapter changes the answer


def test_stream_has_role_first_finish_last_usage_and_done(server, client):
    whole = chat(client, messages=STORY).choices[0].message.content
    chunks = list(chat(client, messages=STORY, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    raw = httpx.post(server["url"] + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                     json={"model": "base", "messages": QUESTION, "max_tokens": 3, "stream": True}).text
    assert raw.rstrip().endswith("data: [DONE]")


def test_a_stop_string_split_across_tokens_stops(client):
    r = chat(client, messages=STORY, max_tokens=20, logprobs=True)
    tokens = [t.token for t in r.choices[0].logprobs.content]
    text = r.choices[0].message.content
    assert "".join(tokens) == text
    i = next(i for i in range(1, len(tokens) - 1) if tokens[i].strip() and tokens[i + 1].strip())
    stop = tokens[i][-1] + tokens[i + 1][0]  # the last character of one token and the first of the next
    cut = text.find(stop)
    for stream in (False, True):
        if stream:
            got = "".join(c.choices[0].delta.content or "" for c in chat(client, messages=STORY, max_tokens=20,
                                                                          stop=stop, stream=True) if c.choices)
        else:
            s = chat(client, messages=STORY, max_tokens=20, stop=[stop, "never appears"])
            got = s.choices[0].message.content
            assert s.choices[0].finish_reason == "stop"
        assert got == text[:cut]


def test_chat_logprobs_have_openais_shape(client):
    r = chat(client, max_tokens=5, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the likeliest
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)


def test_completions_echo_logprobs_score_the_prompt_like_lmzoo(client, reference):
    """What lm-evaluation-harness's local-completions model asks for a log-likelihood task."""
    prompt = "The capital of France is Paris"
    r = client.completions.create(model="base", prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0)
    choice = r.choices[0]
    assert choice.text == prompt and r.object == "text_completion"
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and len(lp.tokens) == len(lp.token_logprobs) == r.usage.prompt_tokens
    tok = reference["tokenizer"]
    ids = tok.encode(prompt)
    with torch.no_grad():
        logp = reference["models"]["base"](torch.tensor([ids]))[0].float().log_softmax(-1)
    expected = [float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert all(len(t) == 1 for t in lp.top_logprobs[1:])
    more = client.completions.create(model="base", prompt=[ids, ids[:3]], max_tokens=4, temperature=0, logprobs=0)
    assert [c.index for c in more.choices] == [0, 1] and all(len(c.logprobs.tokens) <= 4 for c in more.choices)


def test_n_choices_and_seeded_sampling_repeat(client):
    a = chat(client, temperature=0.9, seed=7, n=2)
    b = chat(client, temperature=0.9, seed=7, n=2)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len(a.choices) == 2
    # streamed, the two choices decode side by side; their interleaved chunks reassemble to the same texts
    texts, order = ["", ""], []
    for chunk in chat(client, temperature=0.9, seed=7, n=2, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            order.append(c.index)
    assert texts == [c.message.content for c in a.choices]
    assert order[2:].count(0) and order[order.index(1, 2):].count(0)  # choice 0 still streams after 1 began


def test_batch_independence_greedy_and_seeded(client):
    """A request's output does not depend on what else runs in the batch."""
    alone = [chat(client, max_tokens=16).choices[0].message.content,
             chat(client, max_tokens=16, temperature=0.8, seed=3).choices[0].message.content]

    async def crowded():
        aclient = openai.AsyncOpenAI(base_url=client.base_url, api_key=KEY, max_retries=0)
        others = [aclient.chat.completions.create(model="base", messages=[{"role": "user", "content": q}],
                                                  temperature=0, max_tokens=n)
                  for q, n in (("Write a haiku about rain.", 30), ("Count to ten.", 9))]
        mine = [aclient.chat.completions.create(model="base", messages=QUESTION, temperature=0, max_tokens=16),
                aclient.chat.completions.create(model="base", messages=QUESTION, temperature=0.8, seed=3,
                                                max_tokens=16)]
        return await asyncio.gather(*others, *mine)

    results = asyncio.run(crowded())
    assert [r.choices[0].message.content for r in results[2:]] == alone


def metric(server, name):
    text = httpx.get(server["url"] + "/metrics").text
    m = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else None


def test_a_client_that_disconnects_frees_its_row_and_metrics_count(server, client):
    stream = chat(client, max_tokens=60, stream=True)
    next(iter(stream))
    next(iter(stream))
    stream.close()
    deadline = time.time() + 15
    while time.time() < deadline and metric(server, "lmzoo_batch_rows") != 0:
        time.sleep(0.2)
    assert metric(server, "lmzoo_batch_rows") == 0
    text = httpx.get(server["url"] + "/metrics").text
    for name in ("lmzoo_requests_total", "lmzoo_generated_tokens_total", "lmzoo_queue_length",
                 "lmzoo_time_to_first_token_seconds_bucket", "lmzoo_time_per_output_token_seconds_bucket"):
        assert name in text


# ---------------------------------------------------------------------- errors

def test_each_error_status_in_openais_shape(server, client):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError) as e:
        chat(client, model="no-such-adapter")
    assert e.value.body["code"] == "model_not_found"
    for kwargs, param in (({"temperature": 5}, "temperature"), ({"max_tokens": 100000}, "max_tokens"),
                          ({"n": 99}, "n"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
                          ({"response_format": {"type": "json_object"}}, "response_format"),
                          ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
                          ({"messages": [{"role": "user", "content": "word " * 600}]}, "messages")):
        with pytest.raises(openai.BadRequestError) as e:
            chat(client, **kwargs)
        assert e.value.body["param"] == param, kwargs
    h = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(server["url"] + "/v1/chat/completions", content=b"{not json", headers=h)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(server["url"] + "/v1/completions", content=b"x" * (2 << 20), headers=h)
    assert r.status_code == 413 and r.json()["error"]["message"]
    r = httpx.post(server["url"] + "/v1/chat/completions", json={"model": "base", "messages": QUESTION,
                                                                  "unknown_field": 1, "max_tokens": 2}, headers=h)
    assert r.status_code == 200  # unknown fields are ignored


def test_a_full_queue_answers_503_and_the_batch_drains(server, client):
    async def flood():
        aclient = openai.AsyncOpenAI(base_url=client.base_url, api_key=KEY, max_retries=0, timeout=120)
        return await asyncio.gather(*(aclient.chat.completions.create(
            model="base", messages=QUESTION, temperature=0, max_tokens=40) for _ in range(16)),
            return_exceptions=True)

    results = asyncio.run(flood())
    full = [r for r in results if isinstance(r, openai.APIStatusError)]
    assert full and all(r.status_code == 503 and r.body["code"] == "queue_full" for r in full)
    done = [r for r in results if not isinstance(r, Exception)]
    assert done and len(set(r.choices[0].message.content for r in done)) == 1
    assert metric(server, "lmzoo_batch_rows") == 0


def test_serve_refuses_bad_flags_in_one_line(tmp_path):
    for args, flag in ((["--adapter", "x"], "--adapter"), (["--adapter", f"x={tmp_path}/none"], "--adapter"),
                       (["--max-batch", "0"], "--max-batch")):
        r = subprocess.run([sys.executable, "-m", "lmzoo", "serve", *args], capture_output=True, text=True,
                           timeout=60, env={**os.environ, "LMZOO_API_KEY": ""})
        assert r.returncode == 1 and r.stderr.startswith(f"lmzoo: error: {flag}"), r.stderr
        assert "Traceback" not in r.stderr


# ---------------------------------------------------------------------- the chat page, in a real browser

def test_the_chat_page_streams_an_answer_in_headless_chromium(server):
    """Open GET / in Debian's chromium, give the key, pick the P-tuning adapter, ask, and read the
    streamed answer and its tokens/s as a person would see them."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    if not (os.path.exists("/usr/bin/chromium") and os.path.exists("/usr/bin/chromedriver")):
        pytest.fail("the browser test needs Debian's chromium and chromium-driver (make test installs them as root)")
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    try:
        driver.get(server["url"] + "/")
        key = driver.find_element(By.ID, "key")
        key.send_keys(KEY)
        key.send_keys(Keys.TAB)  # 'change': the page lists the models with the key
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: len(Select(d.find_element(By.ID, "model")).options) == 4)
        Select(driver.find_element(By.ID, "model")).select_by_visible_text("prefix")
        box = driver.find_element(By.ID, "prompt")
        box.send_keys("What is the capital of France?")
        box.send_keys(Keys.ENTER)
        wait.until(lambda d: "tokens/s" in d.find_element(By.ID, "stats").text)
        answer = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")
        assert len(answer) == 1 and answer[0].text.strip()
        assert driver.find_element(By.CSS_SELECTOR, ".msg.user").text == "What is the capital of France?"
        assert not driver.find_elements(By.CSS_SELECTOR, ".msg.error")
    finally:
        driver.quit()

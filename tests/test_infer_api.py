"""`offsite cloud infer` as a real process over TLS, driven by the official `openai` client: models,
completions, chat, streaming, stop strings, usage, and every error status with OpenAI's error shape."""
import json
import subprocess
import sys
import time

import httpx2 as httpx
import openai
import pytest
import torch
from transformers import AutoTokenizer

from offsite.cloud import api_keys
from offsite.cloud.coordinator import Coordinator
from offsite.cloud.identity import StateLayout, init_state
from offsite.cloud.job import JobConfig
from offsite.emulator import methods
from offsite.emulator.build import load_base
from offsite.tensors import to_bytes
from tests.test_infer_engine import job_adapter

TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


def _finished_job(coordinator, base, job_id, method, seed):
    """A job whose last global adapter is a trained-looking one, marked done as finalization leaves it."""
    coordinator.create_job(JobConfig(job_id=job_id, base_model=str(base), emulator_layers=1, method=method, rounds=1,
                                     method_params={"r": 2} if method == "lora" else {}))
    job = coordinator.job(job_id)
    cfg, plan = job.config, job.artifacts.plan
    from transformers import AutoModelForCausalLM
    adapter = job_adapter(lambda: AutoModelForCausalLM.from_pretrained(str(base)), cfg.method_config(), seed, plan)
    assert coordinator.state.close_round(job_id, 0, updates=0, result_sha256=coordinator.blobs.put(to_bytes(adapter)),
                                         reason="trained in the test", artifacts_json=job.artifacts.to_json(), last=True,
                                         now=time.time())
    coordinator.state.set_job_status(job_id, "done")
    return cfg.method_config(), plan, adapter


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    base = root / "chat-base"
    model, tokenizer = load_base(str(tiny_model))
    tokenizer.chat_template = TEMPLATE
    model.save_pretrained(str(base))
    tokenizer.save_pretrained(str(base))
    state_dir = root / "state"
    init_state(state_dir, ["alice"], ["localhost", "127.0.0.1"], 3600)
    coordinator = Coordinator.open(str(state_dir))
    jobs = {name: _finished_job(coordinator, base, name, method, seed)
            for seed, (name, method) in enumerate([("j-lora", "lora"), ("j-full", "full")])}
    state = coordinator.state
    keys = {"lora": api_keys.create_key(state, ["j-lora"])[0], "full": api_keys.create_key(state, ["j-full"])[0]}
    revoked, record = api_keys.create_key(state, ["j-lora"])
    state.revoke_api_key(record.key_id)
    keys["revoked"] = revoked
    keys["expired"] = api_keys.create_key(state, ["j-lora"], expires_at=time.time() + 1.5)[0]
    port_file = root / "port.json"
    proc = subprocess.Popen([sys.executable, "-m", "offsite.cli", "cloud", "infer", "--state", str(state_dir),
                             "--address", "127.0.0.1:0", "--port-file", str(port_file), "--max-tokens", "64"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not port_file.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "the inference server did not start"
        time.sleep(0.2)
    url = f"https://localhost:{json.loads(port_file.read_text())['port']}"
    ca = str(StateLayout(state_dir).ca_cert)
    time.sleep(max(0.0, 1.6 - (time.monotonic() - deadline + 120)))  # the expiring key has expired by now
    opened: list = []
    yield dict(url=url, ca=ca, keys=keys, base=base, jobs=jobs, proc=proc, opened=opened, state=state_dir)
    for c in opened:   # an idle TLS connection would hold the server's graceful shutdown until it closes
        c.close()
    proc.terminate()
    code = proc.wait(30)
    print(proc.stdout.read())
    assert code == 0
    assert not list(StateLayout(state_dir).serving.glob("*.json"))   # removed at a clean exit


def client(server, key="lora"):
    c = openai.OpenAI(base_url=server["url"] + "/v1", api_key=server["keys"].get(key, key),
                      http_client=openai.DefaultHttpxClient(verify=server["ca"]), max_retries=0)
    server["opened"].append(c)
    return c


def expected(server, job, prompt_ids, n):
    cfg, plan, adapter = server["jobs"][job]
    model, tokenizer = load_base(str(server["base"]))
    plugged = methods.apply(model, plan, cfg, {k: v.clone() for k, v in adapter.items()}, on_emulator=False)
    with torch.no_grad():
        out = plugged.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)[0, len(prompt_ids):].tolist()
    if tokenizer.eos_token_id in out:
        out = out[:out.index(tokenizer.eos_token_id)]
    return tokenizer.decode(out, skip_special_tokens=True), len(out)


def test_models_are_the_keys_jobs_and_their_base(server):
    assert sorted(m.id for m in client(server).models.list()) == ["chat-base", "j-lora"]
    assert sorted(m.id for m in client(server, "full").models.list()) == ["chat-base", "j-full"]


@pytest.mark.parametrize("job, key", [("j-lora", "lora"), ("j-full", "full")])
def test_greedy_completion_equals_generate_on_the_plugged_model(server, job, key):
    prompt = "score: 2-1 result:"
    tokenizer = AutoTokenizer.from_pretrained(str(server["base"]))
    text, count = expected(server, job, tokenizer(prompt).input_ids, 12)
    got = client(server, key).completions.create(model=job, prompt=prompt, max_tokens=12, temperature=0)
    assert got.choices[0].text == text
    assert got.usage.prompt_tokens == len(tokenizer(prompt).input_ids) and got.usage.completion_tokens == count
    assert got.choices[0].finish_reason == ("length" if count == 12 else "stop")
    stream = client(server, key).completions.create(model=job, prompt=prompt, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == text


def test_chat_streams_what_it_answers_whole(server):
    messages = [{"role": "system", "content": "match report"}, {"role": "user", "content": "who won?"}]
    c = client(server)
    whole = c.chat.completions.create(model="j-lora", messages=messages, max_tokens=10, temperature=0)
    chunks = list(c.chat.completions.create(model="j-lora", messages=messages, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    base = c.chat.completions.create(model="chat-base", messages=messages, max_tokens=10, temperature=0, seed=1)
    assert base.model == "chat-base"


def test_a_stop_string_ends_the_text_before_it(server):
    c = client(server)
    full = c.completions.create(model="j-lora", prompt="home", max_tokens=20, temperature=0).choices[0].text
    cut = full.strip()[3:6] if len(full.strip()) > 6 else None
    if not cut:
        pytest.skip("the completion is too short to cut")
    got = c.completions.create(model="j-lora", prompt="home", max_tokens=20, temperature=0, stop=[cut]).choices[0]
    assert got.text == full[:full.index(cut)] and got.finish_reason == "stop"


@pytest.mark.parametrize("key, model, kwargs, error, status, param", [
    ("osk-000000000000.nope", "j-lora", {}, openai.AuthenticationError, 401, None),
    ("revoked", "j-lora", {}, openai.AuthenticationError, 401, None),
    ("expired", "j-lora", {}, openai.AuthenticationError, 401, None),
    ("lora", "j-full", {}, openai.PermissionDeniedError, 403, "model"),
    ("lora", "no-such-job", {}, openai.NotFoundError, 404, "model"),
    ("lora", "j-lora", {"temperature": 5}, openai.BadRequestError, 400, "temperature"),
    ("lora", "j-lora", {"top_p": 0}, openai.BadRequestError, 400, "top_p"),
    ("lora", "j-lora", {"n": 2}, openai.BadRequestError, 400, "n"),
    ("lora", "j-lora", {"max_tokens": 65}, openai.BadRequestError, 400, "max_tokens"),
    ("lora", "j-lora", {"stop": ["a", "b", "c", "d", "e"]}, openai.BadRequestError, 400, "stop"),
    ("lora", "j-lora", {"extra_body": {"logit_bias": {"1": 5}}}, openai.BadRequestError, 400, "logit_bias"),
])
def test_errors_have_openai_shape_and_status(server, key, model, kwargs, error, status, param):
    with pytest.raises(error) as caught:
        client(server, key).completions.create(model=model, prompt="hi", **{"max_tokens": 4, **kwargs})
    assert caught.value.status_code == status
    body = caught.value.body
    assert set(body) >= {"message", "type", "param", "code"} and body["param"] == param
    assert "osk-" not in body["message"]     # no secret echoed back


def test_chat_needs_a_template_and_a_body_has_a_limit(server):
    with httpx.Client(verify=server["ca"]) as http:
        big = http.post(server["url"] + "/v1/completions", content=b"x" * (2 << 20),
                        headers={"Authorization": f"Bearer {server['keys']['lora']}", "Content-Type": "application/json"})
        assert big.status_code == 413 and "error" in big.json()
        no_key = http.get(server["url"] + "/v1/models")
        assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
        assert http.get(server["url"] + "/healthz").text == "ok\n"
        metrics = http.get(server["url"] + "/metrics").text
        assert 'offsite_infer_requests_total{model="j-lora",status="200"}' in metrics
        assert "offsite_infer_time_to_first_token_seconds_bucket" in metrics


def test_the_coordinators_status_page_shows_what_is_served(server):
    from offsite.cloud import status_page
    from offsite.cloud.status import serving_summaries

    client(server).completions.create(model="j-lora", prompt="hi", max_tokens=2, temperature=0)
    folder = StateLayout(server["state"]).serving
    deadline = time.monotonic() + 15
    while True:
        summaries = serving_summaries(folder)
        if summaries and summaries[0]["models"].get("j-lora", {}).get("requests", 0) >= 1:
            break
        assert time.monotonic() < deadline, summaries
        time.sleep(0.5)
    assert summaries[0]["bases"]["chat-base"]["resident_adapters"]
    page = status_page.render({"jobs": [], "clients": [], "serving": summaries})
    assert "<h2>Serving</h2>" in page and "j-lora" in page and "mean time to first token" in page
    assert serving_summaries(folder, now=time.time() + 3600) == []   # a stopped server's last word goes stale

"""A Qwen2-style base as Qwen2/2.5 ship it (no BOS token, `<|im_end|>` ends a turn and is EOS, a ChatML
template with a default system turn, sharded weights) and data owners holding chat JSONL: the whole job runs
through real processes, a chat `[eval]` set is scored at finalization, and the served chat answer
(temperature 0) is `generate` on the export for the same conversation."""
import json
import random
import subprocess
import time

import openai
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from offsite import render
from tests.procs import offsite, run_clients, serve_until_done
from tests.test_client_check import cli

CHATML = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
          "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEAMS = ["Ivybridge Albion", "Penrith United", "Newbury Rangers", "Fairhaven Rovers", "Harrow United", "Elswick Rangers"]


def match(rng: random.Random) -> list[dict]:
    home, away = rng.sample(TEAMS, 2)
    a, b = rng.randrange(5), rng.randrange(5)
    result = "draw" if a == b else "home win" if a > b else "away win"
    return [{"role": "user", "content": f"{home} {a}-{b} {away}. Result?"}, {"role": "assistant", "content": result}]


def write_chats(path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    path.write_text("".join(json.dumps({"messages": match(rng)}) + "\n" for _ in range(n)))


@pytest.fixture(scope="module")
def qwen2_base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen2-style")
    corpus = [m["content"] for i in range(200) for m in match(random.Random(i))] + ["You are a helpful assistant.", "system user assistant"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    config = AutoConfig.for_model("qwen2", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
                                  bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(folder), max_shard_size="100KB")
    tokenizer.save_pretrained(str(folder))
    assert len(list(folder.glob("model-*.safetensors"))) > 1 and tokenizer.bos_token_id is None
    return folder


def test_a_qwen2_style_chat_job_trains_evaluates_and_serves_what_it_trained(qwen2_base, tmp_path):
    state, data = tmp_path / "state", []
    for i, name in enumerate(["alice", "bob"]):
        (tmp_path / name).mkdir()
        write_chats(tmp_path / name / "train.jsonl", 60, seed=10 + i)
        data.append(tmp_path / name)
    write_chats(tmp_path / "heldout.jsonl", 20, seed=99)
    write_chats(tmp_path / "alice" / "heldout.jsonl", 10, seed=98)  # alice holds some out: she reports its loss
    cli("cloud", "init", "--state", state, "--clients", "alice,bob")
    (tmp_path / "job.toml").write_text(
        f'[job]\nid = "chat"\nbase_model = "{qwen2_base}"\nrounds = 1\nclients_per_round = 2\n'
        f'[split]\nemulator_layers = 1\ntrain_extra = ["norm", "head"]\n'
        f'[training]\nbatch_size = 8\nepochs = 4.0\nlr = 0.01\nreport_heldout = true\n[adapter]\nmethod = "lora"\nr = 4\n'
        f'[eval]\nsets = {{ chat = "{tmp_path / "heldout.jsonl"}" }}\n')
    cli("cloud", "jobs", "create", "--state", state, "--config", tmp_path / "job.toml")
    server, ports = serve_until_done(state, tmp_path / "port")
    try:
        for c in run_clients(state, ports, data, tmp_path / "work"):
            _, err = c.communicate(timeout=240)
            assert c.returncode == 0, err
        assert server.wait(timeout=120) == 0
    finally:
        server.kill()
    report = json.loads((state / "jobs" / "chat" / "report.json").read_text())
    reported = json.loads(cli("cloud", "status", "--state", state, "--json"))["jobs"][0]["heldout_loss"]
    assert [(r["round"], r["clients"]) for r in reported] == [(1, 1)] and 0 < reported[0]["loss"] < 1e6
    scores = report["eval"]["chat"]  # loss on the assistant's tokens of held-out chats
    assert scores["plug_in"] < scores["full_zero_shot"] - 0.5, scores
    assert set(report["task_accuracy"]["chat"]) >= {"full_zero_shot", "plug_in"}  # short answers: exact match too

    scored = json.loads(cli("cloud", "eval", "--state", state, "--job", "chat", "--data", tmp_path / "heldout.jsonl", "--json"))
    assert scored["examples"] == scored["answerable"] == 20 and scored["rounds_aggregated"] == 1
    assert scored["loss"]["plug_in"] == pytest.approx(scores["plug_in"], abs=1e-3)        # finalization's figure
    assert scored["loss"]["base"] == pytest.approx(scores["full_zero_shot"], abs=1e-3)
    assert scored["exact_match"]["plug_in"] == pytest.approx(report["task_accuracy"]["chat"]["plug_in"], abs=1e-4)

    secret = cli("cloud", "keys", "create", "--state", state, "--job", "chat").splitlines()[1]
    port_file = tmp_path / "infer.json"
    proc = subprocess.Popen(offsite("cloud", "infer", "--state", str(state), "--address", "127.0.0.1:0", "--port-file",
                                    str(port_file), "--max-tokens", "16"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the inference server did not start"
            time.sleep(0.2)
        url = f"https://localhost:{json.loads(port_file.read_text())['port']}/v1"
        with openai.OpenAI(base_url=url, api_key=secret, max_retries=0,
                           http_client=openai.DefaultHttpxClient(verify=str(state / "tls" / "ca.pem"))) as client:
            export = AutoModelForCausalLM.from_pretrained(report["export_dir"]).eval()
            tokenizer = AutoTokenizer.from_pretrained(report["export_dir"])
            for conversation in [match(random.Random(s))[:1] for s in (99, 100, 101)]:
                got = client.chat.completions.create(model="chat", messages=conversation, max_tokens=8, temperature=0)
                prompt = render.chat_prompt_ids(tokenizer, conversation)
                assert prompt == tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                                               return_dict=False)
                with torch.no_grad():
                    out = export.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                          pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)[0, len(prompt):]
                assert got.choices[0].message.content == tokenizer.decode(out, skip_special_tokens=True)
                assert got.usage.prompt_tokens == len(prompt)
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_jobs_own_chat_template_gives_a_base_without_one_chat(tiny_model, tmp_path):
    """The demo's base has no chat template: the job names one; the bundle's tokenizer carries it (so clients
    render chats with it), and so does the export. A template that cannot render a turn is refused at
    jobs create."""
    from offsite.cloud.exports import export_job
    from offsite.emulator.bundle import describe_bundle
    from offsite.errors import ConfigError
    from offsite.textdata import Example
    from tests.test_rounds import make_world

    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    assert not AutoTokenizer.from_pretrained(str(tiny_model)).chat_template
    c, *_ = make_world(tiny_model, tmp_path / "ok", chat_template=template)
    job = c.job("j")
    tokenizer, _, _ = describe_bundle(job.artifacts.bundle_dir)
    assert tokenizer.chat_template == template
    chat = Example("home win", messages=(("user", "2-1?"), ("assistant", "home win")))
    r = render.render(tokenizer, chat)
    assert tokenizer.decode([i for i, keep in zip(r.ids, r.learned) if keep]) == "home win</s>"
    out = export_job(job.config, job.artifacts, c.state.global_adapters("j"), c.blobs, c.layout.jobs / "j",
                     tmp_path / "export", "merged", 0)
    assert AutoTokenizer.from_pretrained(str(out.folder)).chat_template == template
    with pytest.raises(ConfigError, match="chat_template cannot render a user and an assistant turn.*no chats here"):
        make_world(tiny_model, tmp_path / "bad", chat_template="{{ raise_exception('no chats here') }}")

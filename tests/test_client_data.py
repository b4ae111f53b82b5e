"""Data formats, and a bad data file stops the client before any network or training, naming the file and line."""
import pytest
from transformers import AutoTokenizer

from offsite import lm
from offsite.cli import main
from offsite.errors import DataError
from offsite.textdata import Example, read_examples, read_texts


@pytest.mark.parametrize("body, where", [
    ('{"text": "ok"}\n{"text": "ok"\n', ":2:"),
    ('{"text": "ok"}\n\n{"txt": "wrong field"}\n', ":3:"),
    ('{"text": ""}\n', ":1:"),
    ('["not", "an", "object"]\n', ":1:"),
    ("", "no examples"),
])
def test_malformed_files_name_file_and_line(tmp_path, body, where):
    path = tmp_path / "train.jsonl"
    path.write_text(body)
    with pytest.raises(DataError, match=f"train.jsonl{where}" if where.startswith(":") else where):
        read_texts(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_texts(tmp_path / "absent.jsonl")


def _ca(tmp_path):
    """The CA certificate `cloud init` writes."""
    from offsite.cloud.identity import StateLayout, init_state
    init_state(tmp_path / "state", ["alice"], ["localhost"], 3600)
    return StateLayout(tmp_path / "state").ca_cert


def test_client_cli_exits_2_before_contacting_anyone(tmp_path, capsys):
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"text": "fine"}\n{oops\n')
    (tmp_path / "t").write_text("token")
    code = main(["client", "run", "--server", "127.0.0.1:9", "--ca", str(_ca(tmp_path)), "--workdir", str(tmp_path / "w"),
                 "--data", str(bad), "--token-file", str(tmp_path / "t")])
    assert code == 2
    assert "train.jsonl:2" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("ca, token, message", [
    ("alice.token", "alice.token", "--ca {tmp}/alice.token: not a PEM certificate (the coordinator's STATE/tls/ca.pem is; "
                                   "an enrollment token goes to --token-file)"),
    ("ca.pem", "alice.tokn", "--token-file {tmp}/alice.tokn: no such file"),
    ("absent.pem", "alice.token", "--ca {tmp}/absent.pem: CA certificate file not found"),
])
def test_a_wrong_ca_or_token_file_is_named_before_any_network_call(tmp_path, capsys, ca, token, message):
    (tmp_path / "ca.pem").write_bytes(_ca(tmp_path).read_bytes())
    (tmp_path / "alice.token").write_text("0123456789abcdef")
    (tmp_path / "train.jsonl").write_text('{"text": "fine"}\n')
    code = main(["client", "run", "--server", "127.0.0.1:9", "--ca", str(tmp_path / ca), "--workdir", str(tmp_path / "w"),
                 "--data", str(tmp_path / "train.jsonl"), "--token-file", str(tmp_path / token)])
    assert code == 5
    assert message.format(tmp=tmp_path.resolve()) in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_a_ca_from_another_cloud_init_is_a_config_error_at_once(tmp_path, capsys):
    """Not a network blip: no retries, exit 5 in seconds, naming the CA file and what is wrong with it."""
    import time

    from offsite.cloud.coordinator import Coordinator
    from offsite.cloud.identity import init_state
    from offsite.cloud.server import start_server

    tokens = init_state(tmp_path / "real", ["alice"], ["localhost"], 3600)
    other_ca = _ca(tmp_path)  # a second `cloud init`'s CA
    (tmp_path / "train.jsonl").write_text('{"text": "fine"}\n')
    coordinator = Coordinator.open(tmp_path / "real")
    running = start_server(coordinator, coordinator.layout, "127.0.0.1:0", "127.0.0.1:0")
    try:
        started = time.monotonic()
        code = main(["client", "run", "--server", f"localhost:{running.port}", "--enroll-server",
                     f"localhost:{running.enroll_port}", "--ca", str(other_ca), "--workdir", str(tmp_path / "w"),
                     "--data", str(tmp_path / "train.jsonl"), "--token-file", str(tokens["alice"])])
        took = time.monotonic() - started
    finally:
        running.stop(grace=0)
    err = capsys.readouterr().err
    assert code == 5 and took < 20, (code, took, err)
    assert f"is not signed by --ca {other_ca.resolve()}" in err and "another `offsite cloud init`" in err
    assert "retrying" not in err


FORMATS = [  # (file name, body, expected examples as (prompt, completion))
    ("a.jsonl", '{"text": "plain words"}\n', [("", "plain words")]),
    ("b.jsonl", '{"prompt": "Q: 2+2?", "completion": " 4"}\n', [("Q: 2+2?", " 4")]),
    ("c.csv", 'id,body\n1,"first, with comma"\n2,"two\nlines"\n', [("", "first, with comma"), ("", "two\nlines")]),
    ("d.csv", "prompt,completion\nhi,there\n", [("hi", "there")]),
    ("e.txt", "para one\nstill one\n\npara two\n", [("", "para one\nstill one"), ("", "para two")]),
]


@pytest.mark.parametrize("name, body, expected", FORMATS)
def test_every_format_reads_to_examples(tmp_path, name, body, expected):
    path = tmp_path / name
    path.write_text(body)
    got = read_examples(path, text_column="body")
    assert [(e.prompt, e.completion) for e in got] == expected


@pytest.mark.parametrize("name, body, where", [
    ("m.jsonl", '{"messages": [{"role": "user", "content": "hi"}]}\n', ":1: the last message"),
    ("m.jsonl", '{"messages": [{"role": "robot", "content": "hi"}]}\n', ":1: 'messages'"),
    ("p.jsonl", '{"text": "ok"}\n{"prompt": "no completion"}\n', ":2: 'prompt' and 'completion'"),
    ("x.csv", "a,b\n1,2\n", ":1: no column 'text'"),
    ("y.csv", 'text\nfine\n""\n', ":3:"),
])
def test_malformed_formats_name_file_and_line(tmp_path, name, body, where):
    path = tmp_path / name
    path.write_text(body)
    with pytest.raises(DataError, match=f"{name}{where}"):
        read_examples(path)


def test_prompt_tokens_are_context_not_targets(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    row, plain = lm.encode_examples(tokenizer, [Example(" 4", "Q: 2+2?"), Example("just text")], 64)
    ids, learned = row
    n_prompt = len(tokenizer("Q: 2+2?", add_special_tokens=False)["input_ids"])
    assert learned == [False] * (1 + n_prompt) + [True] * (len(ids) - 1 - n_prompt)
    _, _, labels = next(lm.batches([row, plain], 2, tokenizer.pad_token_id))
    assert (labels[0, : 1 + n_prompt] == lm.IGNORE).all() and (labels[0, 1 + n_prompt : len(ids)] >= 0).all()
    assert (labels[1, : len(plain)] >= 0).all()
    packed = lm.pack([row, plain] * 3, 8)
    assert all(len(w[0]) == 8 for w in packed) and sum(not b for w in packed for b in w[1]) >= 2 * (1 + n_prompt)


def test_chat_uses_the_tokenizer_template_and_learns_the_last_turn(tiny_model):
    """A chat trains on exactly what the template renders (offsite.render); a tokenizer without a template
    cannot render one, and says so instead of inventing a format the server would never send."""
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    chat = Example("fine", messages=(("user", "how are you"), ("assistant", "fine")))
    with pytest.raises(DataError, match="chat examples need a chat template"):
        lm.encode_examples(tokenizer, [chat], 64)
    tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    ids, learned = lm.encode_examples(tokenizer, [chat], 64)[0]
    assert tokenizer.decode([t for t, keep in zip(ids, learned) if keep], skip_special_tokens=True).strip() == "fine"
    assert ids == tokenizer.apply_chat_template([{"role": "user", "content": "how are you"},
                                                 {"role": "assistant", "content": "fine"}], tokenize=True, return_dict=False)

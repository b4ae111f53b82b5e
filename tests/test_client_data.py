"""A bad data file stops the client before any network or training, naming the file and line."""
import pytest

from offsite.cli import main
from offsite.errors import DataError
from offsite.textdata import read_texts


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


def test_client_cli_exits_2_before_contacting_anyone(tmp_path, capsys):
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"text": "fine"}\n{oops\n')
    ca = tmp_path / "ca.pem"
    ca.write_text("unused")
    code = main(["client", "run", "--server", "127.0.0.1:9", "--ca", str(ca), "--workdir", str(tmp_path / "w"),
                 "--data", str(bad), "--token-file", str(tmp_path / "t")])
    assert code == 2
    assert "train.jsonl:2" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()

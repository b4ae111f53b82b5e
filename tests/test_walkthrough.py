"""The README's walkthrough cannot go stale: `make demo` runs it exactly as written (offsite.demo.walkthrough);
here, in seconds, every command in it parses with offsite's own parser and the files it names line up."""
import shlex
import subprocess

from offsite.cli import parser
from offsite.cloud.job import JobConfig
from offsite.demo import starter
from offsite.demo.walkthrough import JOB, ROOT, walkthrough


def commands() -> list[list[str]]:
    """Each line's first command as argv: continuation lines joined, up to its first shell operator (& | > ;)."""
    out = []
    for line in walkthrough().replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words = []
        for word in lexer:
            if set(word) <= set("&|;<>()"):
                break
            words.append(word)
        out.append(words)
    return [w for w in out if w]


def test_the_walkthrough_is_valid_bash():
    assert subprocess.run(["bash", "-n", "-c", walkthrough()], capture_output=True).returncode == 0


def test_every_offsite_command_of_the_walkthrough_parses():
    offsite = [argv[1:] for argv in commands() if argv[0] == "offsite"]
    assert len(offsite) >= 8  # init, jobs create, serve, two clients, status, keys, infer
    for argv in offsite:
        args = parser().parse_args(argv)  # an unknown command or flag exits here with argparse's message
        assert callable(args.func), argv
    starter_argv = next(argv for argv in commands() if argv[:3] == ["python", "-m", "offsite.demo.starter"])
    assert starter_argv[3:] == ["first-job"]


def test_the_example_job_fits_what_the_starter_writes(tmp_path):
    """The copied docs/job.example.toml names the starter's base and files, and the job id the commands use."""
    (tmp_path / "models" / "my-base").mkdir(parents=True)  # starter.write_starter's layout, without the weights
    (tmp_path / "data").mkdir()
    for name in ("alice", "bob", "validation"):
        (tmp_path / "data" / f"{name}.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "job.toml").write_text((ROOT / "docs" / "job.example.toml").read_text())
    cfg = JobConfig.from_toml(tmp_path / "job.toml")
    assert cfg.job_id == JOB and cfg.base_model == str((tmp_path / "models" / "my-base").resolve())
    assert cfg.eval_sets == {"validation": str((tmp_path / "data" / "validation.jsonl").resolve())}
    assert cfg.clients_per_round == len(starter.OWNERS) and f"--clients {','.join(starter.OWNERS)}" in walkthrough()
    assert starter.BASE_LAYERS >= cfg.bottom + cfg.top + cfg.emulator_layers

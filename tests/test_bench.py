"""Benchmarks stand alone: they run from a plain `pip install .`, where neither pytest nor tests/ exists."""
import ast
from pathlib import Path

import pytest

BENCH = sorted((Path(__file__).resolve().parents[1] / "bench").glob("*.py"))


@pytest.mark.parametrize("path", BENCH, ids=[p.name for p in BENCH])
def test_a_benchmark_imports_nothing_from_the_tests_or_pytest(path):
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module.split(".")[0])
    assert not modules & {"tests", "pytest", "conftest"}, f"{path.name} imports {sorted(modules & {'tests', 'pytest', 'conftest'})}"


def test_there_are_benchmarks_to_check():
    assert len(BENCH) >= 5

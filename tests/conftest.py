"""Shared fixtures: run the ``vramlab`` CLI in-process and capture what it prints."""
from __future__ import annotations

from typing import NamedTuple

import pytest


class CliResult(NamedTuple):
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys):
    """``cli("estimate", "llama-2-7b", "--json")`` -> CliResult(code, stdout, stderr)."""
    from profiler.cli import main

    def run(*argv: str) -> CliResult:
        capsys.readouterr()  # drop anything printed before this call
        code = main(list(argv))
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run

"""The `specrt` command: generate on the default model (streams text, one-line summary) and
clear errors for bad arguments."""
from __future__ import annotations

import subprocess
import sys

import pytest

from specrt.cli import main


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "specrt.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_unknown_model_name_is_a_clear_error(capsys):
    assert main(["generate", "--prompt", "hi", "--model", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "no-such-model" in err and "smollm2-135m" in err


def test_missing_path_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", "--prompt", "hi", "--model", str(tmp_path / "missing.gguf")]) == 2
    assert "missing.gguf" in capsys.readouterr().err


def test_unknown_proposer_is_a_clear_error(capsys):
    from argparse import Namespace

    from specrt.proposers import create

    with pytest.raises(ValueError, match="unknown proposer"):
        create("medusa-x", target=None, args=Namespace(num_draft=4))


@pytest.mark.slow
@pytest.mark.parametrize("proposer", ["none", "ngram"])
def test_generate_default_model_streams_and_summarizes(proposer):
    r = _run("generate", "--chat", "--prompt", "Write a Python function that adds two numbers.",
             "--max-new-tokens", "24", "--proposer", proposer)
    assert r.returncode == 0, r.stderr
    assert "def " in r.stdout
    summary = [line for line in r.stderr.splitlines() if line.startswith("[specrt]")]
    assert summary and "tok/s" in summary[-1]
    if proposer == "ngram":
        assert "mean accepted length" in summary[-1]

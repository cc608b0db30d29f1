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


@pytest.fixture
def no_model(monkeypatch):
    """Fail if a model is resolved (fetched / loaded): device errors must come first."""
    import specrt.hub

    def no_load(*a, **kw):
        raise AssertionError("the model was resolved before the device was checked")

    monkeypatch.setattr(specrt.hub, "resolve_model", no_load)


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_device_without_cuda_is_a_clear_error(monkeypatch, capsys, no_model, device):
    """--device cuda where torch cannot reach a GPU (a CPU-only build here; no visible GPU on
    a CUDA build) fails with a message, before any model is fetched or loaded."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["generate", "--prompt", "hi", "--device", device]) == 2
    err = capsys.readouterr().err
    assert err.startswith("specrt: error:") and "Traceback" not in err
    assert "CUDA" in err and ("CPU-only" in err or "no CUDA device" in err)
    assert "--device cpu" in err


def test_bad_device_is_a_clear_error(monkeypatch, capsys, no_model):
    import torch

    from specrt.engine import Engine

    assert main(["generate", "--prompt", "hi", "--device", "gpu0"]) == 2
    assert "invalid device 'gpu0'" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA"):
        Engine.from_pretrained("no-such-model", device="cuda")


def test_unknown_proposer_is_a_clear_error(capsys):
    from argparse import Namespace

    from specrt.proposers import create

    with pytest.raises(ValueError, match="unknown proposer"):
        create("medusa-x", target=None, args=Namespace(num_draft=4))
    with pytest.raises(ValueError, match="proposer set"):
        create("ngram|none", target=None, args=Namespace(num_draft=4))


def test_create_lookahead_defaults_and_options():
    """--proposer lookahead: the CPU defaults (docs/lookahead.md), each option overrides one;
    out-of-range values are a clear error."""
    from argparse import Namespace

    from _tiny import tiny_model
    from specrt.proposers import LookaheadProposer, create

    m = tiny_model(seed=1)
    p = create("lookahead", m, Namespace(num_draft=None))
    assert isinstance(p, LookaheadProposer) and (p.window, p.ngram, p.guesses) == (0, 3, 1)
    p = create("lookahead", m, Namespace(num_draft=None, lookahead_window=3, lookahead_ngram=4,
                                         lookahead_guesses=None))
    assert (p.window, p.ngram, p.guesses) == (3, 4, 1)
    with pytest.raises(ValueError, match="ngram >= 2"):
        create("lookahead", m, Namespace(lookahead_ngram=1))


@pytest.mark.slow
@pytest.mark.parametrize("proposer", ["none", "ngram", "lookahead", "self-spec", "cascade", "mtp",
                                      "mlp-speculator", "ngram|medusa"])
def test_generate_default_model_streams_and_summarizes(proposer):
    r = _run("generate", "--chat", "--prompt", "Write a Python function that adds two numbers.",
             "--max-new-tokens", "24", "--proposer", proposer)
    assert r.returncode == 0, r.stderr
    assert "def " in r.stdout
    summary = [line for line in r.stderr.splitlines() if line.startswith("[specrt]")]
    assert summary and "tok/s" in summary[-1]
    if proposer != "none":
        assert "mean accepted length" in summary[-1]
    if "|" in proposer:  # a proposer set: what each member drafted
        assert "drafted by" in summary[-1] and "medusa:" in summary[-1]

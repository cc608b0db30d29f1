"""Per-request and per-run metrics of the engine: speed, time per phase, and the speculative
fields (acceptance rate, mean accepted length, per-depth acceptance histogram)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

PHASES = ("prefill", "propose", "verify", "sample", "rollback", "commit", "host")
# Steps' phases; "target" (the target model's forward inside "verify") is kept apart so that
# the engine's own host time per step can be reported.
STEP_PHASES = ("propose", "verify", "sample", "rollback", "commit", "host")


@dataclass(slots=True)
class RequestMetrics:
    """Counters of one request.

    ``steps`` verify steps emitted ``generated`` tokens, of which ``accepted`` were draft tokens
    (out of ``proposed`` draft tokens offered, counted along the deepest tree path).
    ``depth_hist[d]`` counts steps that accepted exactly ``d`` draft tokens.
    """

    prompt_tokens: int = 0
    generated: int = 0
    steps: int = 0
    proposed: int = 0
    accepted: int = 0
    depth_hist: list = field(default_factory=list)
    first_token_s: float = 0.0
    total_s: float = 0.0

    def record_step(self, max_depth: int, num_accepted: int) -> None:
        self.steps += 1
        self.proposed += max_depth
        self.accepted += num_accepted
        while len(self.depth_hist) <= num_accepted:
            self.depth_hist.append(0)
        self.depth_hist[num_accepted] += 1

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens / draft tokens offered (along each tree's deepest path)."""
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verify step (accepted drafts + the bonus/correction token)."""
        return (self.accepted + self.steps) / self.steps if self.steps else 0.0


@dataclass(slots=True)
class RunMetrics:
    """Totals of one ``generate`` / ``stream`` run."""

    requests: int = 0
    prompt_tokens: int = 0
    generated: int = 0
    steps: int = 0
    proposed: int = 0
    accepted: int = 0
    wall_s: float = 0.0
    phase_s: dict = field(default_factory=lambda: {p: 0.0 for p in PHASES})
    target_s: float = 0.0  # the target model's forward in verify steps
    depth_hist: list = field(default_factory=list)
    preemptions: int = 0
    bandwidth: dict = field(default_factory=dict)
    verify_forwards: int = 0  # target forwards of verify steps (a step of a batch is one)
    verify_rows: int = 0  # query rows in them: tree nodes of every sequence plus aux rows
    #: sizes verified, (tree depth, tree nodes + aux rows) -> sequence-steps
    budget_hist: Counter = field(default_factory=Counter)

    def add_request(self, m: RequestMetrics) -> None:
        self.requests += 1
        self.prompt_tokens += m.prompt_tokens
        self.generated += m.generated
        self.proposed += m.proposed
        self.accepted += m.accepted
        for d, c in enumerate(m.depth_hist):
            while len(self.depth_hist) <= d:
                self.depth_hist.append(0)
            self.depth_hist[d] += c

    @property
    def tokens_per_s(self) -> float:
        return self.generated / self.wall_s if self.wall_s else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted_length(self) -> float:
        steps = sum(self.depth_hist)
        return (self.accepted + steps) / steps if steps else 0.0

    @property
    def host_ms_per_step(self) -> float:
        """Wall time per verify step outside the target model's forward (proposing, tree
        batching, metadata, sampling, rollback, bookkeeping; a drafting model's forwards
        included). On CUDA it is only meaningful with ``Engine(profile=True)`` (synced)."""
        if not self.steps:
            return 0.0
        step_s = sum(self.phase_s[p] for p in STEP_PHASES)
        return 1e3 * (step_s - self.target_s) / self.steps

    @property
    def rows_per_forward(self) -> float:
        """Query rows per verify forward (all sequences of the batch): what a step costs the
        target beyond its weight reads; at batch 1, the tree nodes plus aux rows per step."""
        return self.verify_rows / self.verify_forwards if self.verify_forwards else 0.0

    def summary(self) -> str:
        s = (f"{self.generated} tokens in {self.wall_s:.2f} s ({self.tokens_per_s:.1f} tok/s), "
             f"{self.requests} request(s)")
        if self.proposed:
            s += (f", acceptance {self.acceptance_rate:.1%}, mean accepted length "
                  f"{self.mean_accepted_length:.2f}, depth histogram {self.depth_hist}")
        return s

    def as_dict(self) -> dict:
        return {
            "requests": self.requests, "prompt_tokens": self.prompt_tokens,
            "generated": self.generated, "wall_s": self.wall_s, "tokens_per_s": self.tokens_per_s,
            "proposed": self.proposed, "accepted": self.accepted,
            "acceptance_rate": self.acceptance_rate,
            "mean_accepted_length": self.mean_accepted_length, "depth_hist": list(self.depth_hist),
            "phase_s": dict(self.phase_s), "target_s": self.target_s,
            "host_ms_per_step": self.host_ms_per_step, "preemptions": self.preemptions,
            "verify_forwards": self.verify_forwards, "rows_per_forward": self.rows_per_forward,
            "bandwidth": dict(self.bandwidth),
            "budget_hist": self.budget_histogram(),
        }

    def budget_histogram(self) -> dict:
        """``{"depth/nodes": sequence-steps}``, most used first: the sizes verified (what the
        policy's budgets and the proposer's drafts came to)."""
        return {f"{d}/{n}": c for (d, n), c in
                sorted(self.budget_hist.items(), key=lambda kv: (-kv[1], kv[0]))}

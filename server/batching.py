"""When a model process dispatches its queue to run_batch(): now, or after waiting for a fuller batch (issue 22).

The policy learns two things while serving, and answers "dispatch n items now, or wait until T" (`BatchPolicy.decide`):

- **What a batch costs**: run_batch() time = fixed + per_item x padded size, fitted by weighted least squares over an
  exponentially weighted mean time per padded size seen (`CostModel`). A batch of 9 padded to 16 (`--batch-sizes`)
  costs a 16. Until two sizes have been seen the per-item part is taken as 0: optimistic for batching, so a GPU's
  flat curve is found quickly; one larger batch is enough to learn that a CPU's cost is per item. A size's weight
  (its calls, up to 32) fades by WEIGHT_AGE with every call of any size, and a size below FORGET is dropped; a
  size's first call counts only until its second replaces it. A slow first call (lazy initialisation, no warm-up)
  no longer bends the line for good: it had held a 1 ms model's every batch ~13 ms (0.7 of greedy's rate) and a
  per-item model's ~14 ms.
- **Who is about to arrive, and when**: clients that got an answer send their next request a moment later (closed
  loop). The policy counts the requests the model process holds at the end of each batch (that batch's plus those
  that queued meanwhile: the clients it serves, `population`), and learns how long after a batch's answers the
  k-th of its clients is back, for each k (`Returns`): the HTTP workers answer them and read their next requests
  one after another, so a burst of 14 is back sooner than a burst of 64 on the same cores. An arrival counts, by
  its rank since the last answers, until a batch with some of that burst leaves: with the clients split in two
  groups, the group answered last comes back during the other group's run, a burst of its own. A straggler that
  missed its burst's batch does not count (a client slow once in a hundred returns would then be in most
  estimates, and every wait would be judged too long), nor does an arrival after a pause (later than
  `--batch-delay-ms` after the answers: a client back after 300 ms once stopped every wait for 16 batches). The
  estimate for n clients is the second largest of the n-th returns in the last RETURN_SAMPLES bursts, and never
  under the estimate for fewer; a count no burst had lately is taken as unknown (then the pace of the largest
  known goes on), so that what a busy spell taught fades. The batch waits for the last of the expected clients,
  not most of them (a percentile of all returns, the 90th, left one of 8 clients behind in over half the batches,
  which then waited a whole run; the largest is thrown by one slow return). A single return estimate for all
  counts, learned only while the model idled, kept clients split for good once the load dropped: after 64 clients
  (bursts back in 36 ms), 16 clients alternated batches of 2 and 14 at 192/s, every wait for the 14 judged "not
  worth it" and no return measured again (bench/RESULTS.md 14, fifth pass). With q queued and the
  model idle, up to population - q more are expected by the last answer + the return of their burst. A wait that
  ends, once all were due, with fewer than it hoped for (the load dropped) resets the population to what came, so
  a lone client after a busy spell pays one wait, not one per batch of the history (4). A wait the policy cuts
  itself before they were all due (at the model time it saves) resets nothing: with bursts as long as a run (64
  clients on 2 cores) that is most waits, and the clients are all still coming.

Decision, with the model idle and q queued (first arrival t0, earliest deadline d):
0. Before any batch has been answered nothing is known of who is coming: the first batch waits for a full batch,
   up to `--batch-delay-ms` after its first arrival (Triton's rule: clients starting together fill it, and a
   lone client pays the delay once, on its first request) and a third of any of its requests' time to deadline
   (the run's cost is not known yet).
1. q >= `--batch-max`, or fewer are worth sending now than are queued (see "How many to take"), or nothing else is
   expected (population <= q, e.g. a single client), or there are clients for two full batches (population >= 2 x
   `--batch-max`: 128 clients, batches of 64; the next batch fills while this one runs), or the whole population's
   burst back is too long to wait for (rule 2 for all of them, the model idle from its answers: the clients then go
   in two groups, two runs a cycle, and a wait to merge some of them only idles the model; at 64 clients on 2
   cores, where a burst of 64 takes about a run, such waits made the model idle 17% of the time for a rate 4% under
   greedy's): dispatch now.
2. Waiting for the m expected items pays only if they would arrive while a batch of the q still ran (else they find
   the model free: a fast model is never held) and the wait costs the model less time than a second batch would:
   wait + cost(q + m) < cost(q) + cost(m), i.e. the wait is under the fixed part; with a per-item cost it never is.
   By a margin: the wait must be under MARGIN x that saving. At the break-even a wait gains nothing on average and
   costs p99 (64 clients whose answers take about a run to come back: waiting gave the same rate as not, and a p99
   25-40 ms over greedy's).
   (Comparing items per second of the batch now with the batch after the wait looks right but is not: it sends 14
   of 16 and leaves 2 to start a small batch of their own, and the clients stay split.)
3. Wait until the earliest of: when they are expected, and past it by PATIENCE x their return (a burst a little longer
   than the last ones: its last client, left out, would wait a whole run and split the batches after it); the
   model's last answer + that saving (it never idles longer than a second batch would cost); t0 +
   `--batch-delay-ms`; d - cost(q + m). Each arrival wakes the model process, which asks again: the batch goes the
   moment the expected clients are in.
How many to take: of the q queued (at most batch_max), the count that serves them in the least model time, the rest
going in a batch of their own: with a per-item cost and sizes 8,16, 9 queued go as 8 now and 1 next; with a
per-batch cost, 33 go padded to 64 (taking 32 by "most items per second" left one client a run behind whenever the
learned curve showed a slight slope, and 64 clients split into two groups of 32).
The burst waited for: the queued items that came after the last answers plus those expected (with the clients
split in two groups, the queued group came during the run and only the group just answered is coming).

What the others do, and what this takes from them (their docs, read 2026-12):
- Triton's dynamic batcher: `preferred_batch_size` (dispatch at once when one can be formed, the largest) and
  `max_queue_delay_microseconds` (how long a request may wait for others; default 0). Taken: dispatch at once at
  the best size, a hard delay bound from the first request's arrival. Both are static: the preferred sizes are
  the user's guess of the cost curve, and a fixed delay is paid whether or not anyone comes.
- TF Serving: `allowed_batch_sizes` (pad to the next), `batch_timeout_micros` (an incomplete batch waits this long).
  Taken: padding is part of the cost. The timeout is again static, and a padded batch's cost is not weighed
  against a smaller one.
- BentoML's adaptive batching (the CORK dispatcher): regresses batch time on batch size and estimates the arrival
  rate; releases when waiting longer would pass `max_latency_ms` or the next request is not worth waiting for.
  Taken: the learned linear cost and the "worth waiting" test. Better here: a mean arrival rate cannot see that
  closed-loop clients come back in a burst right after their answers (the rate averaged over a cycle makes waiting
  look break-even, and batches stay split in two groups); the population and return time see it. Padding and
  each request's own deadline are part of the decision, and a single client (population 1) never waits.
No sockets, no threads: the clock is injected, the model process feeds it (`dispatched`, `finished`) and tests
drive it with a fake clock.
"""

from __future__ import annotations

import collections
import time
from typing import Callable, NamedTuple, Optional, Protocol, Sequence

HISTORY = 8  # counts held, two a batch (when it leaves the queue, when it ends): the population is their largest
RETURN_SAMPLES = 16  # bursts whose k-th return is kept, for each k; the second largest is the estimate (docstring)
RETURN_SLACK_S = 0.0005  # added to a return estimate: the next burst's last may come a little later
PATIENCE = 0.5  # a wait may run this fraction of the return past the expected time (a straggler left out waits a run)
MARGIN = 0.8  # a wait must save at least a fifth of a second batch's model time (see rule 2)
COST_DECAY = 0.8  # weight of the previous mean time for a padded size (0.2 to the new sample)
WEIGHT_AGE = 0.98  # a padded size's weight in the fit, per call of any size (see CostModel)
FORGET = 0.05  # a size whose weight fades below this is dropped from the fit: one call ~150 calls ago


class Queued(Protocol):
    arrived: float
    deadline: float


class Decision(NamedTuple):
    """`take` > 0: dispatch that many of the queue's first items now. `take` == 0: wait until `until` (or an
    arrival, whichever comes first) and ask again. `wait_for` is the count the policy hopes for, `due` when it
    expects them all, `why` one word."""

    take: int
    until: float
    why: str
    wait_for: int = 0
    due: float = 0.0


class CostModel:
    """run_batch() seconds for a padded size, as fixed + per_item x size, learned from measured calls."""

    def __init__(self) -> None:
        self.mean: dict[int, float] = {}
        self.count: dict[int, float] = {}  # each size's weight in the fit: its calls, up to 32, fading
        self.calls: dict[int, int] = {}  # each size's calls
        self.fixed = 0.0
        self.per_item = 0.0

    def observe(self, size: int, seconds: float) -> None:
        old = self.mean.get(size)
        # A size's first call stands until its second replaces it (a first call is often a cold one: lazy
        # initialisation, kernels tuned for a new shape); averaged from then on.
        calls = self.calls[size] = self.calls.get(size, 0) + 1
        self.mean[size] = seconds if old is None or calls == 2 else COST_DECAY * old + (1 - COST_DECAY) * seconds
        for other in list(self.count):
            self.count[other] *= WEIGHT_AGE
            if self.count[other] < FORGET and other != size:
                del self.count[other], self.mean[other], self.calls[other]
        self.count[size] = min(self.count.get(size, 0) + 1, 32)
        self._fit()

    def _fit(self) -> None:
        weights = self.count
        total = sum(weights.values())
        mean_n = sum(n * w for n, w in weights.items()) / total
        mean_t = sum(self.mean[n] * w for n, w in weights.items()) / total
        spread = sum(w * (n - mean_n) ** 2 for n, w in weights.items())
        slope = (sum(w * (n - mean_n) * (self.mean[n] - mean_t) for n, w in weights.items()) / spread
                 if spread else 0.0)
        self.per_item = max(0.0, slope)
        self.fixed = max(0.0, mean_t - self.per_item * mean_n)

    @property
    def known(self) -> bool:
        return bool(self.mean)

    def __call__(self, size: int) -> float:
        return self.fixed + self.per_item * size


class Returns:
    """How long after a batch's answers the k-th of the clients coming back arrives, for each k: the n-th return is
    when a burst of n is all back. Learned from each burst's arrivals in order (`learn`); the estimate for each
    count is made then, so that a decision (one per arrival) only looks it up."""

    def __init__(self, most: int):
        # for each rank, its last samples, each with the burst it came from
        self.by_rank = [collections.deque(maxlen=RETURN_SAMPLES) for _ in range(most)]
        self.bursts = 0
        self.estimates: list[float] = []  # for 1, 2, ... clients: as many as the largest burst seen lately

    def learn(self, offsets: Sequence[float]) -> None:
        """One burst: each arrival's seconds after the answers before it."""
        self.bursts += 1
        for rank, offset in enumerate(sorted(offsets)[:len(self.by_rank)]):
            self.by_rank[rank].append((self.bursts, offset))
        # Each rank's second largest (with two samples or fewer, the largest) over the last RETURN_SAMPLES bursts,
        # and never under a lower rank's: the n-th return is never sooner than the (n-1)-th, even when a cut wait no
        # longer reaches rank n. A rank no burst reached lately is not known (nor any above it): the 16th return
        # learned in a busy spell (35 ms: even the first of 64 came back late, on cores shared with 128 clients)
        # said "split pays" to 16 clients for good, as groups of 1 and 15 never came back 16 together to correct
        # it.
        self.estimates = []
        for samples in self.by_rank:
            latest = sorted(offset for burst, offset in samples if burst > self.bursts - RETURN_SAMPLES)
            if not latest:
                break
            known = latest[-2 if len(latest) > 2 else -1]
            self.estimates.append(max(known, self.estimates[-1]) if self.estimates else known)

    def __call__(self, n: int) -> float:
        """Seconds after the answers until n clients are back (0: nothing learned yet). A count larger than any
        burst seen lately goes on at the pace of the largest one (one client's return, if that is all there is)."""
        seen = len(self.estimates)
        if n < 1 or not seen:
            return 0.0
        n = min(n, len(self.by_rank))
        if n <= seen:
            return self.estimates[n - 1] + RETURN_SLACK_S
        last = self.estimates[-1]
        pace = (last - self.estimates[0]) / (seen - 1) if seen > 1 else last
        return last + pace * (n - seen) + RETURN_SLACK_S


class BatchPolicy:
    """See the module docstring. `sizes` are the allowed padded sizes (empty: any), `delay_s` the longest the first
    queued request may be held for others (--batch-delay-ms)."""

    def __init__(self, batch_max: int, sizes: Sequence[int] = (), delay_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic):
        self.batch_max = max(1, batch_max)
        self.sizes = tuple(sorted(s for s in sizes if s <= self.batch_max))
        self.delay_s = delay_s
        self.clock = clock
        self.cost = CostModel()
        self.held: collections.deque[int] = collections.deque(maxlen=HISTORY)
        self.last_answer: Optional[float] = None  # when the last batch's answers went out
        self.returns = Returns(self.batch_max)
        self.burst: list[float] = []  # this burst's arrivals so far, seconds after the last answers
        self.burst_served = False  # its batch has left: later arrivals are stragglers, not returns
        self.unlearned: list[list[float]] = []  # bursts ended, not learned yet (see `learn`)
        self.hoped = 0  # the batch size the last wait was for (0: not waiting)
        self.hoped_by = 0.0  # and when it expected them all

    # --- what the model process tells it ---------------------------------------------------------------------
    def arrived(self, at: float) -> None:
        """A request came at `at`: a return of the burst since the last answers, unless that burst's batch has left
        (a straggler that missed it) or it came after a pause (later than the delay bound)."""
        if self.last_answer is not None and not self.burst_served and 0 <= at - self.last_answer <= self.delay_s:
            self.burst.append(at - self.last_answer)

    def dispatched(self, items: Sequence[Queued], queued_before: int) -> None:
        """A batch left the queue (`queued_before` items were queued just before)."""
        self.held.append(queued_before)
        last = self.last_answer
        # With some of the burst in it, this batch was the burst's; without (the clients are split in two groups,
        # and this is the group that came during the last run), the burst is still coming back, and counts.
        self.burst_served = last is not None and any(item.arrived >= last for item in items)

    def finished(self, padded: int, seconds: float, held: int) -> None:
        """run_batch() of `padded` items took `seconds`; its answers go out now, and `held` requests were in the
        model process at its end (the batch's and those that queued meanwhile). The burst since the last answers
        ends here, and this batch's begins."""
        if seconds > 0:
            self.cost.observe(padded, seconds)
        self.held.append(held)
        self.last_answer = self.clock()
        if self.burst:
            self.unlearned.append(self.burst)
            self.burst = []
        self.burst_served = False

    def learn(self) -> None:
        """Learn from the bursts that ended (about 0.2 ms for one of 64): the model process calls it once the
        answers are out, so that they do not wait for it; a decision first calls it if it was not."""
        for burst in self.unlearned:
            self.returns.learn(burst)
        self.unlearned = []

    # --- what it answers -------------------------------------------------------------------------------------
    @property
    def population(self) -> int:
        """The requests the model process serves at once, as seen over the last batches."""
        return max(self.held, default=0)

    @property
    def return_s(self) -> float:
        """How long after a batch's answers the clients it serves are all back (for /metrics)."""
        return self.returns(self.population)

    def padded(self, n: int) -> int:
        return next((s for s in self.sizes if s >= n), n)

    def saving(self, q: int, m: int) -> float:
        """The model time one batch of q + m saves over q now and m in a batch of their own (rule 2)."""
        return self.cost(self.padded(q)) + self.cost(self.padded(m)) - self.cost(self.padded(q + m))

    def best_take(self, queued: int) -> int:
        """Of `queued` items, how many to dispatch now: the count that serves the first batch_max of them in the
        least model time, the rest going in a batch of their own (ties: more). A per-batch cost takes all of them
        (33 padded to 64 rather than 32 now and 1 left for a run of its own); a per-item cost with padded sizes
        takes a full size (9 queued, sizes 8 and 16: 8 now and 1 next, not 9 padded to 16)."""
        top = min(queued, self.batch_max)

        def model_time(k: int) -> float:
            return self.cost(self.padded(k)) + (self.cost(self.padded(top - k)) if k < top else 0.0)
        candidates = {s for s in self.sizes if s < top} | {top}  # a full allowed size, or all that is queued
        return min(candidates, key=lambda k: (round(model_time(k), 6), -k))

    def decide(self, queue: Sequence[Queued], idle: bool = True) -> Decision:
        decision = self._decide(queue, idle)
        if decision.take:
            if self.hoped > len(queue) and self.clock() >= self.hoped_by:  # they should all be here by now, and
                self.held.clear()  # fewer came: fewer clients now than the history says (a deadline or the delay
                self.held.append(len(queue))  # bound cutting a wait short says nothing about who is coming)
            self.hoped = 0
        elif decision.wait_for:
            self.hoped, self.hoped_by = decision.wait_for, decision.due
        return decision

    def _splits_anyway(self) -> bool:
        """Whether the whole population's burst back is too long to wait for: the model would idle from its
        answers to the last return against rule 2's margin. Then the clients go in two groups (two runs a cycle,
        the model never idle), and a wait to merge some of them only idles the model: the merged batch splits again
        at its next burst."""
        whole = min(self.population, self.batch_max)
        if whole < 2:
            return False
        return self.returns(whole) >= MARGIN * self.saving(1, whole - 1)

    def _decide(self, queue: Sequence[Queued], idle: bool) -> Decision:
        if self.unlearned:
            self.learn()
        now = self.clock()
        q = len(queue)
        if not q or not idle:  # nothing to send, or the model is busy: the caller asks again when it frees
            return Decision(0, float("inf"), "busy" if q else "empty")
        take = self.best_take(q)
        if q >= self.batch_max or take < min(q, self.batch_max):
            return Decision(take, now, "full")
        if self.last_answer is None:
            until = min(queue[0].arrived + self.delay_s,  # a third of any request's time: the run's cost is unknown
                        min(item.arrived + (item.deadline - item.arrived) / 3 for item in queue))
            return Decision(0, until, "cold", self.batch_max, until) if until > now else Decision(take, now, "cold")
        coming = min(self.population - q, self.batch_max - q)
        if coming < 1 or not self.cost.known:
            return Decision(take, now, "alone")
        if self.population >= 2 * self.batch_max:  # two full batches of clients: a wait only idles the model
            return Decision(take, now, "enough coming")
        if self._splits_anyway():
            return Decision(take, now, "split pays")
        free = self.last_answer  # the model has been idle since its last answers
        goal, now_cost = q + coming, self.cost(self.padded(q))
        back_s = self.returns(sum(1 for item in queue if item.arrived >= free) + coming)  # the burst's last
        goal_cost, expected_at = self.cost(self.padded(goal)), free + back_s
        if expected_at - now >= now_cost:  # they would find the model free again after a batch of the q: no gain
            return Decision(take, now, "in time")
        # The model's time to serve the q and the m expected: one batch after the wait, or q now and m later. The
        # model may idle for less than that saving (with a per-batch cost: the fixed part).
        saving = self.saving(q, coming)
        if expected_at - now >= MARGIN * saving:  # at the break-even a wait gains nothing and costs p99
            return Decision(take, now, "not worth it")
        # Wait for the last of them, and past it by PATIENCE x their return for a straggler: left out, it waits a run.
        until = min(expected_at + PATIENCE * back_s, free + saving, queue[0].arrived + self.delay_s,
                    min(item.deadline for item in queue) - goal_cost)
        if until <= now:
            return Decision(take, now, "bound")
        return Decision(0, until, "waiting", goal, expected_at)

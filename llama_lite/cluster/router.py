"""PrefixAffinityRouter: Ray Serve's request router for llama_lite replicas (docs/cluster.md). A request
goes to the replica that was sent the longest beginning of its prompt, whose prefix cache then likely
still holds that beginning's K/V (engine/prefix_cache.py); when loads are uneven, or nothing matches,
to the least loaded one.

Ray's own PrefixCacheAffinityRouter (ray.serve.llm) cannot be imported without vLLM or SGLang, so
this is the same idea on Serve's public RequestRouter API, in-process and without a tree actor: the
router remembers the last REMEMBERED prompts it sent to each replica (a replica's KV-cache rows hold
fewer), and a request's prompt is the `prompt` text of its first argument (replicas.ForwardedRequest)."""

import random
import time
from collections import deque

from ray.serve.request_router import RequestRouter

REMEMBERED = 64
CHOSEN_FOR_S = 30


def common_prefix(a: str, b: str) -> int:
    """How many first characters a and b share."""
    n = min(len(a), len(b))
    k = 0
    while k < n and a[k] == b[k]:
        k += 1
    return k


class PrefixAffinityRouter(RequestRouter):
    def initialize_state(self, imbalance: int = 8, min_match: float = 0.2):
        """`imbalance`: requests more than the least loaded replica's at which a replica is passed over
        whatever it holds (the deployment passes its rows: a prefill saved is not worth a full batch's
        wait); `min_match`: the share of a prompt that must match for affinity to count."""
        self.imbalance, self.min_match = imbalance, min_match
        self.sent = {}  # replica id -> deque of the prompts last sent to it
        # replica id -> requests chosen for it and not completed, counted here as each is chosen (Serve's
        # queue lengths, and even its routed callback, come after a burst of requests has been routed)
        self.ongoing = {}
        self.chosen = {}  # request id -> (replica id chosen, when): counted before Serve says where it went

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        """Ranks, best first: [[the replica holding the longest match]] when it is long enough and that
        replica is not overloaded, then the others one a rank, least loaded first."""
        prompt = _prompt_of(pending_request)
        load = {r.replica_id: self.ongoing.get(r.replica_id, 0) for r in candidate_replicas}
        least = min(load.values(), default=0)
        # Ties at random: requests routed at once see the same loads, and must not all go one way.
        by_load = sorted(candidate_replicas, key=lambda r: (load[r.replica_id], random.random()))
        ranks = [[r] for r in by_load]
        if prompt:
            match = {r.replica_id: self._longest_match(r.replica_id, prompt) for r in candidate_replicas}
            usable = [r for r in candidate_replicas if load[r.replica_id] - least <= self.imbalance]
            best = max(usable, key=lambda r: match[r.replica_id], default=None)
            if best is not None and match[best.replica_id] >= self.min_match * len(prompt):
                ranks = [[best]] + [[r] for r in by_load if r is not best]
        if ranks and pending_request is not None:
            self._count(pending_request.metadata.internal_request_id, ranks[0][0].replica_id)
        return ranks

    def on_request_routed(self, pending_request, replica_id, result):
        self._count(pending_request.metadata.internal_request_id, replica_id)
        self.chosen.pop(pending_request.metadata.internal_request_id, None)  # counted for good
        prompt = _prompt_of(pending_request)
        if prompt:
            self.sent.setdefault(replica_id, deque(maxlen=REMEMBERED)).append(prompt)

    def on_request_completed(self, replica_id, internal_request_id):
        self.ongoing[replica_id] = max(0, self.ongoing.get(replica_id, 0) - 1)

    def on_replica_actor_died(self, replica_id):
        super().on_replica_actor_died(replica_id)
        self.sent.pop(replica_id, None)
        self.ongoing.pop(replica_id, None)

    def _count(self, request_id, replica_id) -> None:
        """Count a request for `replica_id`, uncounting an earlier choice for it; choices that Serve
        never confirmed within CHOSEN_FOR_S (the request was cancelled) are uncounted too."""
        now = time.monotonic()
        for rid, (replica, when) in list(self.chosen.items()):
            if rid == request_id or now - when > CHOSEN_FOR_S:
                del self.chosen[rid]
                self.ongoing[replica] = max(0, self.ongoing.get(replica, 0) - 1)
        self.chosen[request_id] = (replica_id, now)
        self.ongoing[replica_id] = self.ongoing.get(replica_id, 0) + 1

    def _longest_match(self, replica_id, prompt: str) -> int:
        return max((common_prefix(p, prompt) for p in self.sent.get(replica_id, ())), default=0)


def _prompt_of(pending_request) -> str:
    args = getattr(pending_request, "args", None) or ()
    return getattr(args[0], "prompt", "") if args else ""

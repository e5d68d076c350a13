"""A step's rows of logits sampled and scored, each with its own request's settings (sampling.py: one row)."""

import torch

from .sampling import chosen_logprobs, penalize, sample, top_logprobs


def sample_requests(requests, logits, generator):
    """Each request's next id from its row of logits (n, vocab), with its own settings and generator
    (`generator`: for requests without a seed)."""
    if all(r.params.temperature == 0 and not r.params.penalized for r in requests):
        return logits.argmax(dim=-1)
    chosen = []
    for request, row in zip(requests, logits.split(1)):
        p = request.params
        if p.penalized:
            row = penalize(row, request.counts, p.presence_penalty, p.frequency_penalty)
        chosen.append(sample(row, p.temperature, p.top_p, p.top_k, request.generator or generator))
    return torch.cat(chosen)


def requests_logprobs(requests, logits, chosen):
    """Per request: the chosen id's log-probability and its top alternatives, if asked (else None)."""
    lps, tops = [None] * len(requests), [None] * len(requests)
    asked = [i for i, r in enumerate(requests) if r.params.logprobs]
    if asked:
        index = torch.tensor(asked, device=logits.device)
        for i, lp in zip(asked, chosen_logprobs(logits[index], chosen[index]).tolist()):
            lps[i] = lp
        for i in asked:
            if requests[i].params.top_logprobs:
                ids, values = top_logprobs(logits[i], requests[i].params.top_logprobs)
                tops[i] = list(zip(ids.tolist(), values.tolist()))
    return lps, tops

"""Meta's decode loop, kept as the readable core of generation: one batch of prompts, one setting for all.

Prompts are padded into one token tensor; decoding starts from the shortest prompt's end, prompt
tokens are kept with `torch.where`, a finished mask only ORs, the loop stops early once every row is
finished, and truncation is done once on the host with `tolist()`. It samples and scores with the
engine's functions (sampling.py), each row from its own generator.
"""

import torch

from .sampling import chosen_logprobs, draw_seed, request_seed, sample


@torch.inference_mode()
def padded_generate(model, tokenizer, generator, prompt_tokens, max_gen_len, temperature, top_p, top_k, logprobs, echo):
    """New tokens for each prompt (with the prompt first if `echo`), cut to `max_gen_len` and before the
    first stop id; and their log-probabilities if `logprobs`, else None. The prompts are checked already;
    they use KV-cache rows 0..N-1. Row i samples from its own generator, seeded from `generator`."""
    bsz, device = len(prompt_tokens), next(model.parameters()).device
    prompt_lens = [len(p) for p in prompt_tokens]
    lens = torch.tensor(prompt_lens, device=device)
    total_len = max(prompt_lens) + max_gen_len
    tokens = torch.full((bsz, total_len), tokenizer.pad_id, dtype=torch.long, device=device)
    for i, ids in enumerate(prompt_tokens):
        tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.long, device=device)
    # From lengths, not `tokens != pad_id`: a pad id can be a real token inside a prompt.
    prompt_mask = torch.arange(total_len, device=device)[None, :] < lens[:, None]  # (bsz, total_len)
    row_end = lens + max_gen_len  # each row is done once it holds max_gen_len new tokens
    stop_ids = torch.tensor(sorted(tokenizer.stop_ids), device=device)
    finished = torch.zeros(bsz, dtype=torch.bool, device=device)
    token_logprobs = torch.zeros(bsz, total_len, device=device) if logprobs else None
    generators = row_generators(generator, bsz, None, device) if temperature > 0 else None

    prev_pos = 0
    for cur_pos in range(min(prompt_lens), total_len):
        # The first call is the prefill of every row's shared prompt length; then one token a step.
        # Echoed logprobs need every prompt position's logits, otherwise only the last is computed.
        logits = model.forward(tokens[:, prev_pos:cur_pos], prev_pos, last_only=not (logprobs and echo))
        next_token = _sample_rows(logits[:, -1], [cur_pos >= n for n in prompt_lens], generators, temperature, top_p, top_k)
        next_token = torch.where(prompt_mask[:, cur_pos], tokens[:, cur_pos], next_token)
        tokens[:, cur_pos] = next_token
        if logprobs:
            first = cur_pos - logits.shape[1] + 1  # the logits at position p score the token at p + 1
            token_logprobs[:, first : cur_pos + 1] = chosen_logprobs(logits, tokens[:, first : cur_pos + 1])
        finished |= ~prompt_mask[:, cur_pos] & torch.isin(next_token, stop_ids)
        finished |= cur_pos + 1 >= row_end
        prev_pos = cur_pos
        if finished.all():  # the one host sync a step
            break
    return _truncate(tokens, token_logprobs, prompt_lens, max_gen_len, tokenizer.stop_ids, echo)


def _truncate(tokens, token_logprobs, prompt_lens, max_gen_len, stop_ids, echo):
    """Each row's tokens (and logprobs) cut, on the host, to its new ones before the first stop id."""
    out_tokens, out_logprobs = [], []
    rows_logprobs = token_logprobs.tolist() if token_logprobs is not None else None
    for i, row in enumerate(tokens.tolist()):
        n = prompt_lens[i]
        new = row[n : n + max_gen_len]
        end = n + next((j for j, t in enumerate(new) if t in stop_ids), len(new))
        start = 0 if echo else n
        out_tokens.append(row[start:end])
        if rows_logprobs is not None:
            out_logprobs.append(rows_logprobs[i][start:end])
    return out_tokens, (out_logprobs if rows_logprobs is not None else None)


def row_generators(generator, n, seed, device):
    """Row i of a job samples from its own generator, seeded request_seed(seed, i); without a seed,
    the job's seed is drawn from `generator` (Llama.build's seed)."""
    base = draw_seed(generator) if seed is None else seed
    return [torch.Generator(device).manual_seed(request_seed(base, i)) for i in range(n)]


def _sample_rows(logits, due, generators, temperature, top_p, top_k):
    """The next id of each row of `logits` (bsz, vocab): greedy at temperature 0, else each row due
    (past its prompt) sampled alone with its own generator, so it draws what it would draw alone; rows
    still in their prompt draw nothing (0, replaced by their prompt token)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    zero = torch.zeros(1, dtype=torch.long, device=logits.device)
    return torch.cat([sample(row, temperature, top_p, top_k, generator) if is_due else zero
                      for row, is_due, generator in zip(logits.split(1), due, generators)])

"""Run under torchrun by test_parallel.py: build a model split across the ranks, generate, and write
what this rank saw to OUT.rankN.json. Not a test module itself."""

import json
import sys
import time

import torch

from llama_lite import Llama
from llama_lite.model import parallel
from tests.memory import peak_rss_mb


def main(checkpoint, prompts_file, out, max_gen_len, device="cpu"):
    started = time.perf_counter()
    llm = Llama.build(checkpoint, max_seq_len=256, max_batch_size=4, device=device, dtype="float32", seed=7)
    prompts = json.loads(open(prompts_file).read())
    ids = [llm.tokenizer.encode(p, False, False) for p in prompts]
    with torch.inference_mode():
        first = llm.model(torch.tensor([ids[0]], device=llm.device), 0)[0, -1].cpu()
    greedy, _ = llm.generate(ids, int(max_gen_len), temperature=0)
    sampled, _ = llm.generate(ids, 8, temperature=0.9, top_p=0.95)
    result = dict(
        rank=parallel.rank(), world=parallel.world_size(), greedy=greedy, sampled=sampled, logits=first.tolist(),
        params=sum(p.numel() for p in llm.model.parameters()),
        seconds=time.perf_counter() - started, max_rss_mb=peak_rss_mb(),
    )
    with open(f"{out}.rank{parallel.rank()}.json", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:])

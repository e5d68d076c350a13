"""Complete a list of prompts in batches, writing one JSON line per prompt in input order.

    python scripts/complete.py prompts.txt --out completions.jsonl
"""

import json
import os
import sys
import tempfile
from pathlib import Path

from llama_lite import Llama
from llama_lite.cli import run
from llama_lite.generation import check_positive_int
from llama_lite.sampling import check_sampling


def read_prompts(source) -> list:
    """(line number, {"prompt": ..., other fields}) for each non-empty line of a .txt (a prompt a
    line), a .jsonl ({"prompt": ...} a line) or "-" (stdin, a prompt a line)."""
    if source == "-":
        lines, is_jsonl = sys.stdin.read().splitlines(), False
    else:
        path = Path(str(source))
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {path} does not exist; pass a .txt or .jsonl file, or - for stdin")
        lines, is_jsonl = path.read_text(encoding="utf-8").splitlines(), path.suffix == ".jsonl"
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not is_jsonl:
            records.append((number, {"prompt": line}))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source} line {number} is not JSON ({e.msg}); write one {{\"prompt\": ...}} object a line") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise ValueError(f"{source} line {number} has no \"prompt\" string; write one {{\"prompt\": ...}} object a line")
        records.append((number, record))
    if not records:
        raise ValueError(f"{source} holds no prompts")
    return records


def write_atomically(path: Path, text: str) -> None:
    """Write beside the target, then rename: the file appears whole or not at all."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def complete(prompts, out=None, max_gen_len=64, temperature=0.0, top_p=0.9, top_k=None, max_batch_size=8,
             checkpoint=None, tokenizer=None, max_seq_len=2048, device=None, dtype=None, seed=None):
    """Complete PROMPTS (.txt, .jsonl or -) to JSON lines on stdout or, atomically, in --out."""
    from tqdm import tqdm

    check_sampling(temperature, top_p, top_k)
    check_positive_int("--max_gen_len", max_gen_len)
    check_positive_int("--max_batch_size", max_batch_size)
    if out is not None and not Path(str(out)).parent.is_dir():
        raise FileNotFoundError(f"the folder of --out {out} does not exist; create it or write elsewhere")
    records = read_prompts(prompts)
    llm = Llama.build(checkpoint, tokenizer, max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                      device=device, dtype=dtype, seed=seed)
    tok = llm.tokenizer
    for number, record in records:  # report an over-long prompt by its line before any work starts
        n = len(tok.encode(record["prompt"], bos=tok.add_bos, eos=False))
        if n + max_gen_len > max_seq_len:
            raise ValueError(
                f"{prompts} line {number}: the prompt has {n} tokens, and with --max_gen_len {max_gen_len} it "
                f"exceeds --max_seq_len {max_seq_len}; shorten it or raise --max_seq_len"
            )
    lines = []
    with tqdm(total=len(records), desc="completing", unit="prompt", file=sys.stderr) as bar:
        for start in range(0, len(records), max_batch_size):
            batch = [record for _, record in records[start : start + max_batch_size]]
            done = llm.text_completion([r["prompt"] for r in batch], max_gen_len, temperature, top_p, top_k)
            lines += [json.dumps({**r, "generation": d["generation"]}, ensure_ascii=False) + "\n" for r, d in zip(batch, done)]
            bar.update(len(batch))
    if out is None:
        sys.stdout.write("".join(lines))
    else:
        write_atomically(Path(str(out)), "".join(lines))


if __name__ == "__main__":
    run(complete)

"""What the parent prints after the JSON lines: the machine the figures come from, and the table
of speeds with a line for each lever's case and the ratios the targets ask for."""

import os

from bench_levers import PREFIX_CASES, SPEC_CASES
from bench_systems import ALL_SYSTEMS

MEASURED = ("load", "decode_b1", "stream_b1", "decode_b8", "mixed")  # the cases of the speed table


def table(rows, bandwidth_gbs):
    """The speed table, each batch-1 decode against the bandwidth ceiling, and the targets' ratios."""
    get = {(r["system"], r["case"]): r for r in rows}
    systems = sorted({r["system"] for r in rows if r["case"] in MEASURED},
                     key=lambda s: ALL_SYSTEMS.index(s) if s in ALL_SYSTEMS else 99)
    lines = speed_table(systems, get, bandwidth_gbs)
    lines += [f"{r['system']} runs the {r['path']} path: {r['why']}" for r in rows if r["case"] == "load" and "path" in r]
    for cases in (("startup",), PREFIX_CASES, SPEC_CASES, ("constrained",)):
        lines += [line for r in rows if r["case"] in cases for line in case_lines(r)]
    lines += serving_table([r for r in rows if r["case"] == "serving"])
    lines.append("")
    for lite in (s for s in systems if s.startswith("llama_lite")):
        lines += ratio_lines(lite, get)
    return "\n".join(lines)


def speed_table(systems, get, bandwidth_gbs):
    """A row per system: load, batch-1 (generate / engine) and the fraction of the ceiling, batch-8,
    mixed, peak RSS."""
    if not systems:
        return []
    lines = ["| system | load -> first token (s) | batch-1 tok/s (generate / engine) | of ceiling | batch-8 tok/s | "
             "mixed: s (rows) | peak RSS b1 (MB) |", "|---|---|---|---|---|---|---|"]
    for s in systems:
        b1, stream, b8, mixed, load = (get.get((s, c), {}) for c in MEASURED[1:] + ("load",))
        of_ceiling = "-"
        if b1:
            ceiling = bandwidth_gbs * 1e9 / (b1["weight_mb"] * 1e6)  # tok/s if every weight byte streams at that rate
            of_ceiling = f"{b1['tok_s'] / ceiling:.0%} of {ceiling:.0f}"
        lines.append(f"| {s} | {load.get('seconds', '-')} | {b1.get('tok_s', '-')} / {stream.get('tok_s', '-')} | "
                     f"{of_ceiling} | {b8.get('tok_s', '-')} | {mixed.get('seconds', '-')} ({mixed.get('batch', '-')}) | "
                     f"{b1.get('peak_rss_mb', '-')} |")
    return lines


NOTES = {  # the line of a startup, prefix or constrained row, filled in from the row by str.format
    "startup": "{system} startup, {cache} llama_lite cache: first streamed token after {first_token_s} s, "
               "compiled step running after {compiled_after_s} s (compiled: {compiled})",
    "prefix_chat": "{system} prefix_chat: time to first token, turn 1 / turn 10: cache on {ttft_turn1_on_s} / "
                   "{ttft_turn10_on_s} s, off {ttft_turn1_off_s} / {ttft_turn10_off_s} s "
                   "(target: turn 10 within 1.5x of turn 1 with the cache); hit rate {hit_rate}, same tokens {same_tokens}",
    "prefix_shared": "{system} prefix_shared: {seconds_on} s with the cache, {seconds_off} s without: "
                     "{speedup}x (target >= 4x); hit rate {hit_rate}, same tokens {same_tokens}",
    "constrained": "{system} constrained: batch-1 {b1_json_tok_s} vs {b1_free_tok_s} tok/s free ({b1_json_of_free:.2f}x), "
                   "batch-8 {b8_json_tok_s} vs {b8_free_tok_s} ({b8_json_of_free:.2f}x) (target >= 0.9x); "
                   "mask per token p50 {mask_us_p50} us, p99 {mask_us_p99} us ({masked_tokens} tokens); "
                   "compile p50 {compile_ms_p50} ms, max {compile_ms_max} ms over {schemas} schemas; "
                   "vocabulary {vocabulary_s} s once",
}


def case_lines(r):
    """The lines of a startup, prefix, speculation or constrained row."""
    if r["case"] in SPEC_CASES:
        return speculation_lines(r)
    if r["case"] == "constrained":
        r = {**r, **{f"b{b}_json_of_free": r[f"b{b}_json_tok_s"] / r[f"b{b}_free_tok_s"] for b in (1, 8)}}
    return [NOTES[r["case"]].format(**r)]


def speculation_lines(r):
    """A line per batch size of a spec_* row: off's tok/s, then each mode's, speedup and tokens a step."""
    lines = []
    for b in sorted({int(k[1:].split("_")[0]) for k in r if k.endswith("_same_tokens")}):
        modes = [m for m in ("auto", "ngram") if f"b{b}_{m}_tok_s" in r]
        lines.append(f"{r['system']} {r['case']} batch {b}: off {r[f'b{b}_off_tok_s']} tok/s; " + "; ".join(
            f"{m} {r[f'b{b}_{m}_tok_s']} ({r[f'b{b}_{m}_speedup']}x, {r[f'b{b}_{m}_tokens_per_step']} tokens a guessing step)"
            for m in modes) + f"; same tokens {r[f'b{b}_same_tokens']}")
    return lines


def serving_table(served):
    """A row per serving measurement (system, number of clients; the median of its rounds), after a blank
    line, then llama_lite's ratios to the other servers and to its engine; none without."""
    if not served:
        return []
    streams = [r for r in served if "ttft_p50_s" in r]
    return ["", "| system | clients | tok/s | first token p50 / p99 (s) | per token after it p50 / p99 (s) | streams cut short |",
            "|---|---|---|---|---|---|",
            *(f"| {r['system']} | {r['clients']} | {r['tok_s']} | {r['ttft_p50_s']} / {r['ttft_p99_s']} | "
              f"{r['per_token_p50_s']} / {r['per_token_p99_s']} | {r['cut_short']} |" for r in streams),
            *(f"{r['system']} against {r['against']}, {r['clients']} client(s): {r['tok_s_ratio']}x tok/s (median of "
              f"{r['rounds']} rounds' ratios, the servers taken in turns)" for r in served if "against" in r),
            *(f"{r['system']}: server at {r['clients']}: {r['tok_s']} against {r['engine_tok_s']} tok/s, "
              f"{r['ratio']}x (median of {r['pairs']} pairs taken in turns; target >= 0.9x)" for r in served if "ratio" in r)]


def ratio(get, a, case_a, b, case_b, key="tok_s", inverse=False):
    """a's case_a against b's case_b ("1.23x"; inverse for seconds), or "-" where either is missing."""
    x, y = get.get((a, case_a), {}).get(key), get.get((b, case_b), {}).get(key)
    if not x or not y:
        return "-"
    return f"{(y / x if inverse else x / y):.2f}x"


def ratio_lines(lite, get):
    """A llama_lite system against llama.cpp and transformers: batch 1, batch 8, mixed prompts."""
    return [
        f"{lite}: batch-1 vs llama.cpp: generate {ratio(get, lite, 'decode_b1', 'llama_cpp', 'decode_b1')}, engine "
        f"{ratio(get, lite, 'stream_b1', 'llama_cpp', 'decode_b1')} (targets: default >= 1.0x, best >= 1.3x), "
        f"vs transformers {ratio(get, lite, 'decode_b1', 'transformers', 'decode_b1')}",
        f"{lite}: batch-8 vs transformers batch-8 {ratio(get, lite, 'decode_b8', 'transformers', 'decode_b8')} "
        f"(target >= 3.5x), vs llama.cpp batch-1 {ratio(get, lite, 'decode_b8', 'llama_cpp', 'decode_b1')}",
        f"{lite}: mixed prompts vs transformers {ratio(get, lite, 'mixed', 'transformers', 'mixed', 'seconds', inverse=True)}, "
        f"vs llama.cpp {ratio(get, lite, 'mixed', 'llama_cpp', 'mixed', 'seconds', inverse=True)}",
    ]


def machine(device) -> str:
    """What the figures were measured on: the GPU's name, or the CPU's model and the instruction sets
    that choose its kernels (AVX2 only, AVX-512, AVX512-BF16, AMX)."""
    if device.startswith("cuda"):
        import torch

        return f"GPU {torch.cuda.get_device_name(device)}"
    model, flags = "unknown CPU", set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    sets = [name for name in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16") if name in flags]
    return f"{len(os.sched_getaffinity(0))} cores of {model}, {' '.join(sets) or 'no AVX2'}"


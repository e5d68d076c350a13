"""A checkpoint's tensors into a `Transformer`: which weights stay quantized, and how each one is placed.

The model is built on the meta device (no throw-away random init) with int8 and int4 layers where
weights are held quantized; then one tensor at a time is read (dequantized, merged or un-permuted),
cut to this rank's part, converted and assigned.
"""

import ctypes
import sys

import torch
from tqdm import tqdm

from ..errors import CheckpointError
from ..model import integer_kernels, parallel
from ..model.devices import resolve_dtype
from ..model.kernels import int4_modules, int8_head, quantize_int4, quantize_int8, quantize_modules
from ..model.transformer import Transformer
from .checkpoint_types import Int4Values, Int8Values

PROGRESS_BYTES = 50 << 20  # show loading progress for files larger than this,
PROGRESS_DELAY_S = 2.0  # once loading has taken this long (a sub-second load, the usual, shows nothing)
TRIM_EVERY = 16  # tensors read between two return_freed_memory calls (~1 ms each)
LAYER_MATRICES = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                  "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


def quantized_weights(ckpt, quantize, dtype, device, world):
    """({Meta name: "int4", "int8" or "bfloat16"} of the weights held 4-bit, 8-bit or in bfloat16 apart
    from the activations, the activations' dtype).

    quantize="int4" (a CPU): every layer matrix 4-bit for integer_kernels, a GGUF's Q4_0 / Q4_1 blocks as
    stored (their float16 scales too), others quantized; the embedding bfloat16 and the output head
    int8 by rows (kernels.Int8Head; a tied embedding shares it) whatever their blocks. Activations
    stay float32 (dtype None or "float32"); the kernels round their inputs to 8 bits themselves. dtype="bfloat16" computes in
    bfloat16 throughout, and keeps a GGUF's 4-bit blocks without quantize."""
    bf16 = dtype in ("bfloat16", torch.bfloat16)
    if quantize == "int4" and (device.type != "cpu" or dtype in ("float16", torch.float16)):
        raise ValueError("quantize='int4' runs on a CPU, with float32 or bfloat16 activations; pass device='cpu' and "
                         "dtype='float32' or dtype='bfloat16' (or dtype=None), or quantize=None")
    if quantize == "int8" or not (quantize == "int4" or (ckpt.stored and device.type == "cpu" and bf16 and world == 1)):
        return {}, resolve_dtype(dtype, device)
    ends = ("tok_embeddings.weight", "output.weight")  # looked up, or multiplied for every row alike
    quantized = {name: "int4" for name, kind in ckpt.stored.items() if kind == "int4" and name not in ends}
    if quantize == "int4":
        quantized.update({f"layers.{i}.{m}.weight": "int4" for i in range(ckpt.args["n_layers"]) for m in LAYER_MATRICES})
    if not bf16:  # the embedding: half float32's bytes; the head: a quarter, one kernel for any rows
        quantized.update({"tok_embeddings.weight": "bfloat16", "output.weight": "int8" if world == 1 else "bfloat16"})
    return quantized, torch.bfloat16 if bf16 else torch.float32


def load_model(ckpt, params, quantized: dict, quantize, dtype, device, tokenizer_vocab_size: int) -> Transformer:
    """The model of `params` holding the checkpoint's tensors, on `device` in `dtype` (the weights in
    `quantized`, from quantized_weights, held as int4; every matrix int8 with quantize="int8"), its KV
    cache allocated, in eval mode.
    Ids from `tokenizer_vocab_size` on are never sampled (see Transformer)."""
    world = parallel.world_size()
    # fairscale's layers cannot be made on the meta device; they get uninitialised memory instead.
    with torch.device("meta" if world == 1 else device):
        model = Transformer(params, tokenizer_vocab_size)
        if quantize == "int8":
            quantize_modules(model, dtype)
        int4_layers = int4_modules(model, torch.bfloat16, {name.removesuffix(".weight") for name, kind in quantized.items()
                                                           if kind == "int4"})
        if quantized.get("output.weight") == "int8":
            int8_head(model, ckpt.tied)
    if int4_layers:
        integer_kernels.native()
    state = _read_state(ckpt, quantized, model, int4_layers, dtype, device)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise CheckpointError(f"{ckpt.path}: its tensors do not match its metadata ({detail[:300]})") from None
    model.setup_cache()
    return model.eval()


def _read_state(ckpt, quantized, model, int4_layers, dtype, device) -> dict:
    """The state dict to assign: one tensor at a time read (dequantized, merged or un-permuted), cut
    to this rank's part, converted, placed; a tied output head shares the embedding's tensors."""
    local_shapes = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    state, int4_parts = {}, {}
    as_stored = frozenset(name for name, kind in quantized.items() if kind == "int4") & ckpt.stored.keys()

    def is_int8(name):
        module, _, kind = name.rpartition(".")
        return kind == "weight" and module + ".scale" in local_shapes

    def held_dtype(name):
        """The dtype a weight is read in: int4 layers quantize from float32; int8 ones are quantized
        as read (a reader's Int8Values) where no rank cuts a part of a row first."""
        if name.rpartition(".")[0] in int4_layers:
            return torch.float32
        if is_int8(name):
            return torch.int8 if parallel.world_size() == 1 else torch.float32
        return torch.bfloat16 if quantized.get(name) == "bfloat16" else dtype

    progress = tqdm(ckpt.tensors(as_stored, held_dtype), total=ckpt.n_tensors, desc="loading",
                    unit="tensor", leave=False, file=sys.stderr, delay=PROGRESS_DELAY_S,
                    disable=ckpt.size < PROGRESS_BYTES or not parallel.is_main())
    for i, (name, tensor) in enumerate(progress):
        if i % TRIM_EVERY == 0:
            return_freed_memory()
        module, _, kind = name.rpartition(".")
        if module in int4_layers:  # 4-bit values as stored, or quantized now; packed once a fused matrix is whole
            _add_int4_part(state, int4_parts, int4_layers[module], name, tensor)
            continue
        tensor = parallel.shard(name, tensor, local_shapes.get(name, tensor.shape))
        if is_int8(name):  # an int8 layer (the head, or quantize="int8"): quantized as read
            q, scale = tensor if isinstance(tensor, Int8Values) else quantize_int8(tensor.to(device))
            state[name], state[module + ".scale"] = q.to(device), scale.to(device)
        else:
            state[name] = tensor.to(device=device, dtype=held_dtype(name))
    return_freed_memory()
    if ckpt.tied and "tok_embeddings.weight" in state:
        for part in ("weight", "scale") if "output.scale" in local_shapes else ("weight",):  # the same tensors, not copies
            state[f"output.{part}"] = state[f"tok_embeddings.{part}"]
    return state


def return_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing). Loading
    frees many small buffers between the weights it keeps, and glibc keeps such holes resident: without
    this, 35-60 MB at the end and up to 150 MB during loading, a large part of a batch-1 run's peak."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _add_int4_part(state, parts, target, name, tensor):
    """Keep one weight (or bias) of an int4 layer; once every part of its matrix is in, pack it into
    `state` (the parts' rows one after another, as kernels.FUSED_INT4 orders them)."""
    (fused, members), kind = target, name.rpartition(".")[2]
    if kind == "weight" and not isinstance(tensor, Int4Values):
        tensor = Int4Values(*quantize_int4(tensor))
    got = parts.setdefault((fused, kind), {})
    got[name.rpartition(".")[0]] = tensor
    if len(got) < len(members):
        return
    ordered = [got[m] for m in members]
    del parts[(fused, kind)]
    if kind == "weight":
        q, scale, offset = (torch.cat(x) for x in zip(*ordered))
        state[fused + ".weight"], state[fused + ".scales"] = integer_kernels.pack(q, scale, offset)
    else:
        state[fused + "." + kind] = torch.cat(ordered).to(torch.bfloat16)

"""`serve`: a checkpoint behind OpenAI's HTTP API (the server itself is llama_lite/server/)."""

import signal
import socket
import sys
from pathlib import Path

from ..checks import check_whole, is_whole
from ..model import parallel
from .flags import build_arguments, build_llama, documented
from .runner import run_and_exit


@documented(
    host="the address to listen on; 0.0.0.0 opens it to the network. E.g. --host 0.0.0.0",
    port="the TCP port. E.g. --port 8080",
    api_key="require 'Authorization: Bearer KEY' on every request. E.g. --api_key s3cret",
    max_queue="requests that may wait for a row; more are answered 429. E.g. --max_queue 256",
    max_body_mb="the largest request body in MB; larger ones are answered 413 unread. E.g. --max_body_mb 32",
    max_batch_size="requests generated at once (KV-cache rows). E.g. --max_batch_size 32",
    seed="seed the sampling of requests that bring no seed. E.g. --seed 1",
    ray="serve replicas on Ray Serve (pip install -e \".[ray]\"): local starts a cluster here, auto or HOST:PORT "
        "joins a running one; requests go to the replica holding their prompt's beginning (docs/cluster.md). E.g. --ray local",
    replicas="with --ray: engine replicas (one Llama each), --threads split between them. E.g. --replicas 2",
)
def serve(checkpoint: str = None, tokenizer: str = None, host: str = "127.0.0.1", port: int = 8000,
          api_key: str = None, max_queue: int = 64, max_body_mb: float = 8, max_batch_size: int = 8,
          max_seq_len: int = None, device: str = None, dtype: str = None, seed: int = None, quantize: str = None,
          compile: bool = None, no_prefix_cache: bool = False, chat_template: str = None, threads: int = None,
          speculative: str = "auto", ray: str = None, replicas: int = None):
    """Serve a checkpoint over OpenAI's HTTP API (default: SmolLM2-135M-Instruct) on http://HOST:PORT/v1.

    Every client shares the engine's batch of --max_batch_size rows; up to --max_queue more requests
    wait for a row, and one more is answered 429. With --api_key, requests must send
    'Authorization: Bearer KEY'. --port 0 takes a free port (printed). SIGTERM or Ctrl-C ends the
    running requests and stops (exit 0). With --ray, --replicas engines on a Ray cluster serve the
    same API, each request routed to the replica whose prefix cache holds its prompt's beginning.
    """
    check_whole("--max_batch_size", max_batch_size, 1)
    check_whole("--max_queue", max_queue, 0)
    if isinstance(max_body_mb, bool) or not isinstance(max_body_mb, (int, float)) or not 0 < max_body_mb < 1 << 20:
        raise ValueError(f"--max_body_mb must be a number of megabytes > 0, got {max_body_mb!r}")
    if api_key is not None and (not isinstance(api_key, str) or not api_key):
        raise ValueError("--api_key must be a non-empty string")
    if parallel.world_size() > 1:
        raise ValueError("serve runs in one process; start it without torchrun")
    if ray is not None or replicas is not None:
        return _serve_on_ray(ray, replicas, host, port, threads, checkpoint, api_key, max_queue, max_body_mb,
                             build_arguments(max_batch_size, checkpoint, tokenizer, max_seq_len, device, dtype, seed,
                                             quantize, compile, no_prefix_cache, chat_template, None, speculative))
    sock = _listen(host, port)  # bound before the weights load: a busy port fails at once
    try:
        llm = build_llama(max_batch_size, checkpoint, tokenizer, max_seq_len, device, dtype, seed, quantize, compile,
                          no_prefix_cache, chat_template, threads, speculative)
        from ..server.app import serve as run_server

        name = _model_name(checkpoint)
        bound = sock.getsockname()[1]
        where = f"[{host}]" if ":" in str(host) else host
        print(f"serving {name} at http://{where}:{bound}/v1 ({max_batch_size} rows, {llm.threads} threads); Ctrl-C to stop",
              file=sys.stderr, flush=True)
        # The server takes SIGTERM and SIGINT while it runs; one more while it shuts down is ignored:
        # a server stopped as asked exits 0.
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda signum, frame: None)
        run_server(llm, name, sock, api_key=api_key, max_queue=max_queue, max_body_mb=max_body_mb)
    finally:
        sock.close()


def _serve_on_ray(ray, replicas, host, port, threads, checkpoint, api_key, max_queue, max_body_mb, build):
    """serve --ray: the flags checked, then replicas on Ray Serve until SIGTERM or Ctrl-C."""
    if ray is None:
        raise ValueError("--replicas needs --ray (replicas on a Ray cluster); add --ray local, or leave --replicas out")
    replicas = 1 if replicas is None else replicas
    check_whole("--replicas", replicas, 1)
    if not (is_whole(port) and 1 <= port <= 65535):
        raise ValueError(f"--port with --ray must be a whole number in 1..65535 (Ray Serve takes no free port), got {port!r}")
    from ..cluster.ray_connect import check_address, import_ray
    from ..cluster.replicas import serve_replicas

    address = check_address(ray)
    import_ray("ray.serve")  # a missing extra is named before any work
    _listen(host, port).close()  # a busy port fails at once, before Ray starts
    serve_replicas(address, replicas, host, port, build, threads, _model_name(checkpoint), api_key, max_queue, max_body_mb)


def serve_main():
    run_and_exit(serve)


def _model_name(checkpoint) -> str:
    if checkpoint is None:
        return "SmolLM2-135M-Instruct"
    path = Path(str(checkpoint))
    return path.stem if path.suffix == ".gguf" else path.name


def _listen(host, port) -> socket.socket:
    """A socket bound to host:port (port 0: a free one), before any weights load; uvicorn listens on it."""
    if not (is_whole(port) and 0 <= port <= 65535):
        raise ValueError(f"--port must be a whole number in 0..65535, got {port!r}")
    sock = None
    try:
        infos = socket.getaddrinfo(str(host), port, type=socket.SOCK_STREAM)
        sock = socket.socket(infos[0][0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(infos[0][4])
    except (OSError, UnicodeError) as e:
        if sock is not None:
            sock.close()
        reason = getattr(e, "strerror", None) or e
        raise ValueError(f"cannot listen on {host}:{port} ({reason}); pick another --port or --host") from None
    return sock

"""The ``specrun serve`` command.  Imports only click and specrun's CLI module (loaded already) at
the top, so ``specrun --help`` lists it cheaply; FastAPI, uvicorn and the pipeline are imported
when it runs."""

from __future__ import annotations

import click

from specrun.cli import backend_options, generate
from specrun.errors import SpecrunError

# the drafting options of `specrun generate`, the very same click options (names, defaults, help)
_GENERATE_OPTIONS = ("drafter", "draft", "draft_backend", "draft_device", "num_draft_tokens", "tree", "draft_min_prob", "draft_gate")


def _generate_options(f):
    by_name = {p.name: p for p in generate.params}
    missing = [n for n in _GENERATE_OPTIONS if n not in by_name]
    if missing:
        raise RuntimeError(f"`specrun generate` has no option(s) {', '.join(missing)} any more")
    f.__click_params__ = getattr(f, "__click_params__", []) + [by_name[n] for n in reversed(_GENERATE_OPTIONS)]
    return f


@click.command("serve")
@backend_options
@_generate_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: all interfaces).")
@click.option("--port", "-p", type=int, default=8000, show_default=True, help="Port to listen on (0: any free port).")
@click.option("--max-queue", type=int, default=16, show_default=True,
              help="Requests that may wait while one runs; more answer 429 with Retry-After.")
@click.option("--max-new-tokens", "-n", type=int, default=128, show_default=True,
              help="max_tokens of a request that sets none.")
@click.option("--served-model-name", default=None,
              help="Model id of the API (/v1/models) [default: the target's name or folder name].")
@click.option("--graceful-timeout", type=float, default=30.0, show_default=True,
              help="Seconds Ctrl-C / SIGTERM waits for in-flight requests before stopping them.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True)
def serve_command(backend, device, precision, target, threads, drafter, draft, draft_backend, draft_device,
                  num_draft_tokens, tree, draft_min_prob, draft_gate, host, port, max_queue, max_new_tokens, served_model_name,
                  graceful_timeout, log_level):
    """Serve the model over an OpenAI-compatible HTTP API (chat and text completions, streaming,
    /v1/models, /health, /metrics), one request at a time in arrival order."""
    import socket
    from pathlib import Path

    from specrun.eagle3 import parse_tree
    from specrun.models import DEFAULT_MODEL

    tree = parse_tree(tree)
    if tree is not None and drafter not in ("eagle3", "auto"):
        raise SpecrunError("--tree applies to --drafter eagle3")
    if num_draft_tokens < 1:
        raise SpecrunError(f"--num-draft-tokens must be >= 1, got {num_draft_tokens}")
    if max_queue < 0:
        raise SpecrunError(f"--max-queue must be >= 0, got {max_queue}")
    if max_new_tokens < 1:
        raise SpecrunError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if not 0 <= port <= 65535:
        raise SpecrunError(f"--port must be in 0..65535, got {port}")
    # bind first: a port in use is reported before the model loads, and --port 0 gets a real port
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(2048)
    except OSError as exc:
        raise SpecrunError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --host/--port") from None
    sock.set_inheritable(True)
    bound_port = sock.getsockname()[1]

    import uvicorn

    from specrun.pipeline import Pipeline

    from .app import create_app

    pipe = Pipeline.load(
        target, backend=backend, device=device, precision=precision, drafter=drafter, draft=draft,
        draft_backend=draft_backend, draft_device=draft_device, num_draft_tokens=num_draft_tokens,
        options={"threads": threads} if threads else None, tree=tree, draft_min_prob=draft_min_prob, draft_gate=draft_gate,
    )
    model_id = served_model_name or (Path(target).expanduser().name if target and Path(target).expanduser().is_dir()
                                     else target or DEFAULT_MODEL)
    app = create_app(pipe, model_id=model_id, max_queue=max_queue, default_max_tokens=max_new_tokens)
    shown = f"[{host}]" if ":" in host else host
    t = pipe.target
    click.echo(f"specrun serve: {model_id} ({t.backend}/{t.device}/{t.precision}, drafter {pipe.drafter.name}, "
               f"k={num_draft_tokens}) on http://{shown}:{bound_port}/v1 (max queue {max_queue})", err=True)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=graceful_timeout, lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])

"""The ``specrun`` command line."""

from __future__ import annotations

import json
import os
import sys

import click

from .drafters import DEFAULT_LOOKUP_MIN_PROB, DEFAULT_MIN_PROB
from .errors import SpecrunError, disk_full


class SpecrunGroup(click.Group):
    """Turns every SpecrunError (and a full disk) into one line on stderr and exit status 2 — never a
    traceback.  Commands of tool packages (bench, train-draft, conformance, serve ...) come from
    ``specrun.commands`` entry points through the ``register_commands`` hook and are imported only
    when they run or help lists them; a tool that fails to load is reported in one line and never
    breaks the other commands."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tool_errors: dict[str, str] = {}
        self._loaded: set[str] = set()

    def _tool_entry_points(self) -> dict:
        import importlib.metadata as md

        return {ep.name: ep for ep in md.entry_points(group=COMMANDS_GROUP)}

    def _load_tool(self, name: str, ep) -> None:
        if name in self._loaded:
            return
        self._loaded.add(name)
        from .plugins import load_tool

        error = load_tool(ep, self)
        if error:
            self.tool_errors[name] = error

    def get_command(self, ctx, name):
        cmd = super().get_command(ctx, name)
        if cmd is not None:
            return cmd
        ep = self._tool_entry_points().get(name)
        if ep is None:
            return None
        self._load_tool(name, ep)
        cmd = super().get_command(ctx, name)
        if cmd is None:
            error = self.tool_errors.get(name, f"the plugin behind entry point '{ep.value}' registered no '{name}' command")
            return _broken_tool(name, ep, error)
        return cmd

    def list_commands(self, ctx):
        for name, ep in self._tool_entry_points().items():
            self._load_tool(name, ep)
        return sorted(set(super().list_commands(ctx)) | set(self._tool_entry_points()))

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SpecrunError as exc:
            click.echo(f"specrun: error: {exc}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("specrun: interrupted", err=True)
            ctx.exit(130)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, BrokenPipeError):
            raise  # click's own exits, usage errors and a closed pipe (`specrun ... | head`)
        except Exception as exc:
            message = disk_full(exc)
            if message is None and isinstance(exc, OSError) and exc.strerror and not os.environ.get("SPECRUN_DEBUG"):
                where = f": {exc.filename}" if exc.filename else ""
                message = f"{exc.strerror}{where} (check the path and its permissions)"
            if message is None:
                if os.environ.get("SPECRUN_DEBUG"):
                    raise
                # a bug, not the user's input: one line, and how to get the traceback to report it
                click.echo(f"specrun: internal error: {type(exc).__name__}: {exc} (a bug in specrun or a plugin; "
                           f"rerun with SPECRUN_DEBUG=1 for the traceback and report it)", err=True)
                ctx.exit(1)
            click.echo(f"specrun: error: {message}", err=True)
            ctx.exit(2)


COMMANDS_GROUP = "specrun.commands"


def _broken_tool(name: str, ep, error: str) -> click.Command:
    """Stands in for a tool command whose plugin failed to load: help says so, running it is one line."""
    package = getattr(getattr(ep, "dist", None), "metadata", {}).get("Name", "?") if getattr(ep, "dist", None) else "?"

    @click.command(name, context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
                   help=f"(unavailable: {error})", add_help_option=False)
    def broken():
        raise SpecrunError(f"the '{name}' command could not be loaded ({error}); reinstall its package "
                           f"({package}) or set SPECRUN_DEBUG=1 for the traceback")

    return broken


@click.group(cls=SpecrunGroup)
@click.option("--backend", "-b", "backend", default=None, metavar="NAME",
              help="Backend for the command that follows, e.g. `specrun --backend NAME generate PROMPT` "
              "(the command's own --backend wins).")
@click.version_option(package_name="specrun")
@click.pass_context
def main(ctx: click.Context, backend: str | None) -> None:
    """Speculative decoding for LLMs with pluggable execution backends."""
    if not backend:
        return
    name = ctx.invoked_subcommand
    cmd = main.get_command(ctx, name) if name else None
    if cmd is not None and not any(p.name == "backend" for p in cmd.params):
        takers = [n for n in main.list_commands(ctx)
                  if any(p.name == "backend" for p in (main.get_command(ctx, n) or click.Command(n)).params)]
        raise click.UsageError(f"'{name}' takes no --backend; put --backend only before "
                               f"a command that has one ({', '.join(takers)})")
    ctx.default_map = dict(ctx.default_map or {})  # the default of the command's --backend option
    if name:
        ctx.default_map[name] = {**ctx.default_map.get(name, {}), "backend": backend}


def at_least_one(ctx: click.Context, param: click.Parameter, value):
    """click callback of options that count something (``--threads``): < 1 is one line, checked
    while the command line is parsed, before anything is loaded or converted."""
    if value is not None and value < 1:
        raise SpecrunError(f"{param.opts[0]} must be >= 1, got {value}")
    return value


def threads_option(help: str = "CPU threads for the backend."):
    """``--threads N`` (N >= 1) for every command that runs a backend (generate, bench, conformance,
    train-draft)."""
    return click.option("--threads", type=int, default=None, callback=at_least_one, help=help)


def backend_options(f):
    f = click.option("--backend", "-b", default="auto", show_default=True,
                     help="Execution backend (see `specrun backends`); auto: the fastest installed for the device, "
                     "as each backend's measured preference says (README, 'Choosing a backend').")(f)
    f = click.option("--device", "-d", default="cpu", show_default=True, help="Device of the backend (cpu, cuda, GPU, NPU ...).")(f)
    f = click.option("--precision", default=None, help="Compute precision (f32, bf16, f16, int8 ...); default: the backend's.")(f)
    f = click.option("--target", "-m", default=None, help="Model id or local transformers folder [default: smollm2-135m-instruct].")(f)
    f = threads_option()(f)
    return f


@main.command()
@click.argument("prompt")
@backend_options
@click.option("--drafter", type=click.Choice(["auto", "none", "ngram", "model", "eagle3", "eagle3+ngram"]), default="auto",
              show_default=True,
              help="auto: eagle3+ngram (prompt lookup when the text repeats, else the EAGLE-3 head) with --draft's "
              "head, or off CPUs with the one shipped for the target; 'model' when --draft is a draft model; else "
              "ngram (on a CPU prompt lookup alone measured faster than the shipped head).")
@click.option("--draft", default=None, help="Draft model folder (--drafter model) or EAGLE-3 head folder (--drafter eagle3; "
              "default: the head shipped for the target).")
@click.option("--draft-backend", default=None, help="Backend of the draft model [default: the target's].")
@click.option("--draft-device", default=None, help="Device of the draft model [default: the target's].")
@click.option("--num-draft-tokens", "-k", type=int, default=4, show_default=True, help="Draft tokens verified per target call.")
@click.option("--tree", default=None, metavar="DEPTH,TOPK,NODES",
              help="eagle3: EAGLE-2/3 dynamic tree drafting (e.g. 5,4,16) instead of a chain of k tokens.")
@click.option("--draft-min-prob", type=float, default=None,
              help=f"Stop a draft at the first position whose estimated acceptance is below this: an eagle3 "
              f"chain's top draft probability [default: {DEFAULT_MIN_PROB}], prompt lookup's record of its own "
              f"acceptance [default: {DEFAULT_LOOKUP_MIN_PROB}]; 0: always k.")
@click.option("--draft-gate/--no-draft-gate", default=True, show_default=True,
              help="Greedy: a model-backed drafter (eagle3 chains, a draft model) drafts only while its drafts "
                   "measure faster than plain steps on the request, and prompt lookup drafts the length with the most "
                   "expected tokens per measured second; --no-draft-gate: every call drafts all it can.")
@click.option("--max-new-tokens", "-n", type=int, default=128, show_default=True)
@click.option("--temperature", "-t", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=int, default=0, show_default=True, help="0 = off.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=None, help="Seed for sampling (reproducible runs).")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--raw", is_flag=True, help="Do not apply the chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
def generate(prompt, backend, device, precision, target, threads, drafter, draft, draft_backend, draft_device,
             num_draft_tokens, tree, draft_min_prob, draft_gate, max_new_tokens, temperature, top_k, top_p, seed, stop, raw, as_json):
    """Generate text for PROMPT with speculative decoding."""
    from .decode import check_prompt_text
    from .eagle3 import parse_tree
    from .pipeline import Pipeline
    from .sampling import SamplingParams, check_stop_strings
    from .tokenizer import check_text

    tree = parse_tree(tree)
    if tree is not None and drafter not in ("eagle3", "auto"):
        raise SpecrunError("--tree applies to --drafter eagle3")
    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    stop = check_stop_strings(stop)
    check_text(check_prompt_text(prompt), "the prompt")
    pipe = Pipeline.load(
        target, backend=backend, device=device, precision=precision, drafter=drafter, draft=draft,
        draft_backend=draft_backend, draft_device=draft_device, num_draft_tokens=num_draft_tokens,
        options={"threads": threads} if threads else None, tree=tree, draft_min_prob=draft_min_prob, draft_gate=draft_gate,
    )
    kwargs = dict(max_new_tokens=max_new_tokens, sampling=sampling, stop=stop, raw=raw)
    if as_json:
        click.echo(json.dumps(pipe.generate(prompt, **kwargs).as_dict()))
        return
    for piece in pipe.stream(prompt, **kwargs):
        click.echo(piece, nl=False)
        sys.stdout.flush()
    click.echo()
    st = pipe.last.stats
    click.echo(
        f"[{st.backend}/{st.device}/{st.precision}{' (auto: fastest installed)' if pipe.auto_backend else ''} drafter={st.drafter}{f' ({st.draft_runs_on})' if st.draft_runs_on else ''} "
        f"k={st.num_draft_tokens}] "
        f"{st.new_tokens} tokens, acceptance length {st.acceptance_length:.2f} tokens/call, "
        f"{st.tokens_per_second:.1f} tokens/s, first token {st.time_to_first_token:.2f} s, stop: {st.stop_reason}",
        err=True,
    )

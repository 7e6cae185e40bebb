"""``specrun serve``: an OpenAI-compatible HTTP server over a loaded speculative pipeline (a tool
beside the core, registered through the ``specrun.commands`` entry point group)."""

import specrun


@specrun.hookimpl
def register_commands(cli):
    from .command import serve_command

    cli.add_command(serve_command, "serve")

"""``specrun backends`` (the registered backends and their state) and ``specrun export`` (a model in
a backend's format, built into the cache ahead of time): a tool beside the core, registered through
the ``specrun.commands`` entry point group as third-party commands are."""

import specrun


@specrun.hookimpl
def register_commands(cli):
    from .command import backends, export_command

    cli.add_command(backends, "backends")
    cli.add_command(export_command, "export")

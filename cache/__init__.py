"""``specrun cache``: listing and clearing specrun's on-disk cache (a tool beside the core,
registered through the ``specrun.commands`` entry point group; the cache itself is ``specrun.store``)."""

import specrun


@specrun.hookimpl
def register_commands(cli):
    from .command import cache_command

    cli.add_command(cache_command, "cache")

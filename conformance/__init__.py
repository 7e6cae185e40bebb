"""The specrun conformance kit: ``specrun conformance`` (registered like a plugin through the
``specrun.commands`` entry point group) and a pytest plugin a backend package runs in its own CI."""

import specrun


@specrun.hookimpl
def register_commands(cli):
    from .cli import conformance_command

    cli.add_command(conformance_command)

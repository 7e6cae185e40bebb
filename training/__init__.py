"""Training EAGLE-3 heads: ``specrun train-draft`` (``trainer``) and its data engine (``data``), a tool
beside the core, registered like a plugin through the ``specrun.commands`` entry point group."""

import specrun


@specrun.hookimpl
def register_commands(cli):
    from .trainer import train_draft_command

    cli.add_command(train_draft_command, "train-draft")

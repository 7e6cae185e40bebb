"""specrun's benchmarks: ``specrun bench`` (a tool beside the core, registered like a plugin through
the ``specrun.commands`` entry point group) and the scripts in this folder (``steps.py``,
``data_engine.py``)."""

import specrun


@specrun.hookimpl
def register_commands(cli):
    from .run import bench_command

    cli.add_command(bench_command, "bench")

"""The plugin contract.  A backend package declares one entry point in the ``specrun.backends``
group pointing at a module with::

    import specrun

    @specrun.hookimpl
    def register_backends(register):
        register(MyBackend())
"""

from collections.abc import Callable

import pluggy

hookspec = pluggy.HookspecMarker("specrun")
hookimpl = pluggy.HookimplMarker("specrun")


@hookspec
def register_backends(register: Callable) -> None:
    """Call ``register(backend)`` once per backend this plugin provides."""


@hookspec
def register_commands(cli) -> None:
    """Add click commands to the ``specrun`` group: ``cli.add_command(command)``.  A tool package
    declares one entry point per command in the ``specrun.commands`` group (the entry point's name
    is the command's), so the CLI imports a tool only when its command runs or help lists it."""

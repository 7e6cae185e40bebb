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

"""tfsd's Python worker: the process a Python session's code runs in.

tfsd hosts every session in a worker process of its own. For a *Python session* that process
is a Python interpreter that has already imported TensorFlow and Keras (``python -m
tfsd_worker``, started by the daemon, never by hand): the session's calls run there one at a
time, on the interpreter's main thread, and a fresh process per trial gives Keras 3 a real
reset.

What user code sees
-------------------

``tfsd_worker.state``
    The session's namespace: whatever a call stores there is still there for the session's
    next call, in the same process. Attribute and item access are the same thing::

        import tfsd_worker

        def build():
            tfsd_worker.state.model = keras.Sequential([...])

        def train(epochs):
            model = tfsd_worker.state["model"]
            model.fit(..., epochs=epochs)
            return model.evaluate(...)

    It is also a mapping: ``"model" in state``, ``len(state)``, iteration over the names,
    ``state.get(name, default)``, ``state.keys()``, ``.items()``, ``.values()``, ``del
    state.name``, ``del state[name]``. A name stored as an attribute hides a method of the
    same name (``state.keys = 1`` hides ``keys()``); ``vars(state)`` is always the plain dict.

    - ``PurgeVariables`` empties it (then does what ``ResetGraph`` does).
    - ``ResetGraph`` keeps it: Keras' and TensorFlow's global state is cleared
      (``keras.backend.clear_session()``, ``tf.compat.v1.reset_default_graph()``) and garbage
      collected, but objects held here stay alive.
    - ``RecycleSession`` with ``preserve_variables`` carries it to the session's next worker
      process: Keras models (``keras.Model`` and subclasses) stored directly under a name
      travel in Keras' own saving format (``model.save("….keras")`` / ``keras.models.
      load_model``); everything else travels with cloudpickle. Anything that cannot travel
      (a lock, an open socket or file, a generator...) makes the recycle fail with
      FAILED_PRECONDITION naming the attribute; delete it first (``del state.name``).
      Models with custom layers must have them registered (``@keras.saving.
      register_keras_serializable()``) in code the next process imports.

Output
    Everything a call writes to ``sys.stdout`` and ``sys.stderr`` is streamed to the caller
    as it is written (line by line, or when flushed). Writes below Python (C libraries
    writing to file descriptors 1 and 2, e.g. TensorFlow's own C++ logging) are not: they
    go to the daemon's log (fd 2) or nowhere (fd 1).

Cancellation
    A cancelled call gets a ``KeyboardInterrupt`` raised in its code (at the next Python
    bytecode; a blocking sleep or wait on the main thread is woken). Code that catches it
    and goes on is killed by the daemon after a grace period.

Importing this package is cheap and starts nothing; only ``python -m tfsd_worker`` runs a
worker.
"""

from __future__ import annotations

from typing import Any, Iterator

__all__ = ["State", "state"]


class State:
    """A namespace with attribute and item access: ``state.x`` is ``state["x"]``."""

    def __getitem__(self, name: str) -> Any:
        try:
            return vars(self)[name]
        except KeyError:
            raise KeyError(name) from None

    def __setitem__(self, name: str, value: Any) -> None:
        if not isinstance(name, str):
            raise TypeError(f"state names are strings, not {type(name).__name__}")
        vars(self)[name] = value

    def __delitem__(self, name: str) -> None:
        try:
            del vars(self)[name]
        except KeyError:
            raise KeyError(name) from None

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails: the name is not stored.
        raise AttributeError(f"tfsd_worker.state has no {name!r}")

    def __contains__(self, name: object) -> bool:
        return name in vars(self)

    def __iter__(self) -> Iterator[str]:
        return iter(list(vars(self)))

    def __len__(self) -> int:
        return len(vars(self))

    def __bool__(self) -> bool:
        return bool(vars(self))

    def __repr__(self) -> str:
        return f"tfsd_worker.state({', '.join(vars(self))})"

    def get(self, name: str, default: Any = None) -> Any:
        return vars(self).get(name, default)

    def keys(self):
        return vars(self).keys()

    def values(self):
        return vars(self).values()

    def items(self):
        return vars(self).items()

    def clear(self) -> None:
        vars(self).clear()

    def __reduce__(self):
        # The namespace is the worker's: pickling it (e.g. a function that closes over it)
        # refers to the receiving process's `tfsd_worker.state`, not a copy.
        return (_the_state, ())


def _the_state() -> State:
    return state


#: The session's namespace (see the module's documentation).
state = State()

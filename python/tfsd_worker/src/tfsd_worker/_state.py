"""`tfsd_worker.state` carried to a fresh worker: `export_state` and `import_state`.

The bytes are tfsd's own format, only ever read by another Python worker:

    MAGIC, then pickle.dumps([(name, kind, payload, custom_objects), ...])

`kind` is "pickle" (payload: `cloudpickle.dumps(value)`) or "keras" (payload: the bytes of
`model.save("….keras")`; `custom_objects`: cloudpickled `{name: class}` of the model's layer
classes that are not Keras' own, given to `keras.models.load_model`). The outer list holds only
strings and bytes, so every name is restored, or named in the error, on its own.
"""

from __future__ import annotations

import importlib
import os
import pickle
import sys
import tempfile
from typing import Any

import cloudpickle

from tfsd_worker._errors import FAILED_PRECONDITION, INVALID_ARGUMENT, WorkerError

MAGIC = b"tfsd-python-state/1\n"

PICKLE = "pickle"
KERAS = "keras"

# How deep, and how widely, a failed pickle is searched for the object that could not be pickled.
_SEARCH_DEPTH = 6
_SEARCH_WIDTH = 200


def describe(value: Any) -> str:
    kind = type(value)
    return f"{kind.__module__}.{kind.__qualname__}"


def pickle_error(value: Any, error: BaseException, where: str) -> str:
    """`error` (from pickling `value`, known as `where`) as a message naming the culprit."""
    path, culprit, culprit_error = _find_unpicklable(value, where, error, _SEARCH_DEPTH)
    message = f"{path} (a {describe(culprit)}) cannot be pickled: {culprit_error}"
    return message


def _find_unpicklable(value, where, error, depth):
    """The innermost part of `value` that fails to pickle on its own: (path, object, error)."""
    if depth == 0:
        return where, value, error
    children: list[tuple[str, Any]] = []
    if isinstance(value, dict):
        children = [(f"{where}[{key!r}]", item) for key, item in list(value.items())]
    elif isinstance(value, (list, tuple, set, frozenset)):
        children = [(f"{where}[{index}]", item) for index, item in enumerate(value)]
        if isinstance(value, (set, frozenset)):
            children = [(f"{where} item", item) for _, item in children]
    else:
        attributes = getattr(value, "__dict__", None)
        if isinstance(attributes, dict) and not isinstance(value, type):
            children = [(f"{where}.{name}", item) for name, item in list(attributes.items())]
    for path, child in children[:_SEARCH_WIDTH]:
        try:
            cloudpickle.dumps(child)
        except Exception as child_error:  # noqa: BLE001 - any failure is the one we look for
            return _find_unpicklable(child, path, child_error, depth - 1)
    return where, value, error


def _keras():
    return sys.modules.get("keras")


def _is_keras_model(value: Any) -> bool:
    keras = _keras()
    if keras is None:
        return False
    model = getattr(keras, "Model", None)
    return isinstance(model, type) and isinstance(value, model)


def _custom_objects(model) -> bytes:
    """The model's own classes that Keras cannot find by itself, cloudpickled; b"" if none.

    Classes importable in the next process are pickled by reference, classes defined in the
    user's code (a script's `__main__`, a pickled function) by value.
    """
    keras = _keras()
    classes = {type(model)}
    try:
        layers = model._flatten_layers(include_self=True, recursive=True)  # noqa: SLF001
        classes.update(type(layer) for layer in layers)
    except Exception:  # noqa: BLE001 - Keras internals; the model's class alone is a start
        pass
    custom = {}
    for kind in classes:
        if kind.__module__.split(".")[0] in ("keras", "tf_keras", "tensorflow"):
            continue
        custom[kind.__name__] = kind
        try:
            custom[keras.saving.get_registered_name(kind)] = kind
        except Exception:  # noqa: BLE001
            pass
    if not custom:
        return b""
    try:
        return cloudpickle.dumps(custom)
    except Exception:  # noqa: BLE001 - load_model names the class it then misses
        return b""


def _save_keras(model) -> bytes:
    with tempfile.TemporaryDirectory(prefix="tfsd-state-") as directory:
        path = os.path.join(directory, "model.keras")
        model.save(path)
        with open(path, "rb") as saved:
            return saved.read()


def _load_keras(payload: bytes, custom_objects: bytes):
    keras = importlib.import_module("keras")
    objects = pickle.loads(custom_objects) if custom_objects else None
    with tempfile.TemporaryDirectory(prefix="tfsd-state-") as directory:
        path = os.path.join(directory, "model.keras")
        with open(path, "wb") as saved:
            saved.write(payload)
        # The file is one this runtime wrote (as trusted as the cloudpickled entries):
        # safe_mode=False lets Lambda layers' code load.
        return keras.models.load_model(path, custom_objects=objects, safe_mode=False)


def export_state(namespace) -> tuple[bytes, int]:
    """The namespace as bytes, and how many names it holds; WorkerError if any cannot travel."""
    entries = []
    failures = []
    for name, value in list(vars(namespace).items()):
        if _is_keras_model(value):
            try:
                entries.append((name, KERAS, _save_keras(value), _custom_objects(value)))
            except Exception as error:  # noqa: BLE001 - reported by name below
                failures.append(
                    f"state.{name} (a {describe(value)}): Keras could not save it: "
                    f"{type(error).__name__}: {error}"
                )
            continue
        try:
            entries.append((name, PICKLE, cloudpickle.dumps(value), b""))
        except Exception as error:  # noqa: BLE001 - reported by name below
            failures.append(pickle_error(value, error, f"state.{name}"))
    if failures:
        raise WorkerError(
            FAILED_PRECONDITION,
            "tfsd_worker.state cannot be carried to a new worker: "
            + "; ".join(failures)
            + " (delete what cannot travel, e.g. `del tfsd_worker.state.name`, and retry)",
        )
    return MAGIC + pickle.dumps(entries, protocol=pickle.HIGHEST_PROTOCOL), len(entries)


def import_state(data: bytes, namespace) -> None:
    """Replaces the namespace's contents with what `export_state` produced elsewhere."""
    if not data:
        vars(namespace).clear()
        return
    data = bytes(data)
    if not data.startswith(MAGIC):
        raise WorkerError(
            INVALID_ARGUMENT, "import_state: these bytes are not a Python worker's exported state"
        )
    try:
        entries = pickle.loads(data[len(MAGIC) :])
    except Exception as error:  # noqa: BLE001
        raise WorkerError(
            INVALID_ARGUMENT, f"import_state: the exported state is damaged: {error}"
        ) from None
    restored = {}
    failures = []
    for name, kind, payload, custom_objects in entries:
        try:
            if kind == KERAS:
                restored[name] = _load_keras(payload, custom_objects)
            elif kind == PICKLE:
                restored[name] = cloudpickle.loads(payload)
            else:
                failures.append(f"state.{name}: unknown kind {kind!r}")
        except Exception as error:  # noqa: BLE001 - reported by name below
            failures.append(f"state.{name}: {type(error).__name__}: {error}")
    if failures:
        raise WorkerError(
            FAILED_PRECONDITION,
            "tfsd_worker.state could not be restored in the new worker: " + "; ".join(failures),
        )
    vars(namespace).clear()
    vars(namespace).update(restored)

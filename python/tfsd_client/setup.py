"""Build hook: generates the tfsd.v1 stubs from the repository's proto/ into the built package.

The stubs are not checked in: they are generated from `proto/tfsd/v1/control.proto` and
`proto/tfsd/v1/tfsd.proto` (found at `../../proto`, or `$TFSD_PROTO_ROOT`) into
`tfsd_client/_gen/` of the build, with their imports rewritten to live under
`tfsd_client._gen`.

- `control_pb2` holds every message that carries no tensor (sessions, resets, events, Python
  sessions' Call); it needs only protobuf. The client builds its stubs from it.
- `tfsd_pb2` holds the service and the tensor-carrying Run messages; it imports TensorFlow's own
  `tensorflow.core.framework.tensor_pb2` (and with it all of TensorFlow), so the client imports
  it only where tensors are involved.

The generated code checks at import that the protobuf runtime is at least the version of the
protoc that generated it, and of the same major version. pyproject.toml pins grpcio-tools for
the build and declares the matching protobuf range for the runtime; `check_gencode` below fails
the build if another grpcio-tools (e.g. with --no-build-isolation) would break that promise.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
PROTOS = ("tfsd/v1/control.proto", "tfsd/v1/tfsd.proto")

# The runtime protobuf range pyproject.toml declares (`protobuf>=6.33.5,<7`): the generated code
# must accept every version in it, i.e. be gencode 6.x no newer than 6.33.5.
RUNTIME_PROTOBUF_MIN = (6, 33, 5)


def proto_root() -> Path:
    root = Path(os.environ.get("TFSD_PROTO_ROOT", HERE.parent.parent / "proto"))
    for proto in PROTOS:
        if not (root / proto).is_file():
            raise SystemExit(f"tfsd-client: {root / proto} not found; set TFSD_PROTO_ROOT")
    return root


def check_gencode(module: Path) -> None:
    found = re.search(r"^# Protobuf Python Version: (\d+)\.(\d+)\.(\d+)", module.read_text(), re.M)
    if found is None:
        return  # an old protoc that writes no version and no runtime check
    gencode = tuple(int(part) for part in found.groups())
    if gencode[0] != RUNTIME_PROTOBUF_MIN[0] or gencode > RUNTIME_PROTOBUF_MIN:
        version = ".".join(map(str, gencode))
        raise SystemExit(
            f"tfsd-client: grpcio-tools generated code for protobuf {version}, which would "
            f"refuse the runtime protobuf>={'.'.join(map(str, RUNTIME_PROTOBUF_MIN))},"
            f"<{RUNTIME_PROTOBUF_MIN[0] + 1} this package declares; build with the grpcio-tools "
            "pyproject.toml names (plain `pip install`, without --no-build-isolation)"
        )


def generate(out: Path) -> None:
    import grpc_tools

    out.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    # In a child process: grpc_tools' compiler crashes in a process that has TensorFlow loaded.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"--proto_path={proto_root()}",
            f"--proto_path={well_known}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            *PROTOS,
        ],
        check=True,
    )
    for package in (out, out / "tfsd", out / "tfsd" / "v1"):
        (package / "__init__.py").touch()
    for module in (out / "tfsd" / "v1").glob("*.py"):
        text = module.read_text()
        # `from tfsd.v1 import control_pb2 as ...` and, for tfsd.proto's `import public`,
        # `from tfsd.v1.control_pb2 import *`.
        text = re.sub(r"^from tfsd\.v1([ .])", r"from tfsd_client._gen.tfsd.v1\1", text, flags=re.M)
        module.write_text(text)
    check_gencode(out / "tfsd" / "v1" / "control_pb2.py")


class BuildWithStubs(build_py):
    def run(self) -> None:
        super().run()
        generate(Path(self.build_lib) / "tfsd_client" / "_gen")


setup(cmdclass={"build_py": BuildWithStubs})

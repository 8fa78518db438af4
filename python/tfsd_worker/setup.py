"""Build hook: generates the tfsd.worker.v1 stubs from the repository's proto/ into the package.

The stubs are not checked in: `proto/tfsd/worker/v1/worker.proto` and the files it imports
(`tensorflow/core/framework/{tensor,tensor_shape,types}.proto`, tfsd's SUBSET copies of
TensorFlow's files) are compiled from `../../proto` (or `$TFSD_PROTO_ROOT`) into
`tfsd_worker/_gen/` of the build, and rewritten so that

* they import one another from `tfsd_worker._gen`, never from the real `tensorflow` package
  (the worker's preload is configurable: it may not import TensorFlow at all), and
* they are added to a private descriptor pool (`tfsd_worker._gen.POOL`), not to protobuf's
  default one: TensorFlow registers its own, different, `tensorflow/core/framework/tensor.proto`
  there, and two different files of one name in one pool conflict.

The generated code checks at import that the protobuf runtime is at least the version of the
protoc that generated it, and of the same major version. pyproject.toml pins grpcio-tools for
the build and declares the matching protobuf range for the runtime; `check_gencode` fails the
build if another grpcio-tools (e.g. with --no-build-isolation) would break that promise.
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
WORKER_PROTO = "tfsd/worker/v1/worker.proto"
# worker.proto and everything it imports (not protobuf's well-known types).
PROTOS = (
    WORKER_PROTO,
    "tensorflow/core/framework/tensor.proto",
    "tensorflow/core/framework/tensor_shape.proto",
    "tensorflow/core/framework/types.proto",
)
PACKAGE = "tfsd_worker._gen"

# The runtime protobuf range pyproject.toml declares (`protobuf>=6.33.5,<7`): the generated code
# must accept every version in it, i.e. be gencode 6.x no newer than 6.33.5.
RUNTIME_PROTOBUF_MIN = (6, 33, 5)

POOL_MODULE = '''"""Generated protobuf stubs of tfsd's worker protocol (see setup.py); do not edit.

Every generated module adds its file to POOL, a descriptor pool of its own: protobuf's default
pool is TensorFlow's, which holds a different tensorflow/core/framework/tensor.proto.
"""

from google.protobuf import descriptor_pool as _descriptor_pool

POOL = _descriptor_pool.DescriptorPool()
'''


def proto_root() -> Path:
    root = Path(os.environ.get("TFSD_PROTO_ROOT", HERE.parent.parent / "proto"))
    if not (root / WORKER_PROTO).is_file():
        raise SystemExit(f"tfsd-worker: {root / WORKER_PROTO} not found; set TFSD_PROTO_ROOT")
    return root


def check_gencode(text: str) -> None:
    found = re.search(r"^# Protobuf Python Version: (\d+)\.(\d+)\.(\d+)", text, re.M)
    if found is None:
        return  # an old protoc that writes no version and no runtime check
    gencode = tuple(int(part) for part in found.groups())
    if gencode[0] != RUNTIME_PROTOBUF_MIN[0] or gencode > RUNTIME_PROTOBUF_MIN:
        version = ".".join(map(str, gencode))
        raise SystemExit(
            f"tfsd-worker: grpcio-tools generated code for protobuf {version}, which would "
            f"refuse the runtime protobuf>={'.'.join(map(str, RUNTIME_PROTOBUF_MIN))},"
            f"<{RUNTIME_PROTOBUF_MIN[0] + 1} this package declares; build with the grpcio-tools "
            "pyproject.toml names (plain `pip install`, without --no-build-isolation)"
        )


def rewrite(text: str) -> str:
    """Points one generated module at the private pool and package."""
    # Imports of the other generated files: `from tensorflow.core.framework import tensor_pb2
    # as ...` becomes `from tfsd_worker._gen.tensorflow.core.framework import ...`.
    text, _ = re.subn(
        r"^from (tensorflow\.core\.framework|tfsd\.worker\.v1) import",
        rf"from {PACKAGE}.\1 import",
        text,
        flags=re.M,
    )
    text, pools = re.subn(
        r"\b_descriptor_pool\.Default\(\)", "_tfsd_worker_pool", text
    )
    if pools != 1:
        raise SystemExit(
            f"tfsd-worker: expected one descriptor_pool.Default() in generated code, found {pools}"
        )
    # The pool is imported right after protobuf's own imports.
    text, imports = re.subn(
        r"^(from google\.protobuf import descriptor_pool as _descriptor_pool\n)",
        rf"\1from {PACKAGE} import POOL as _tfsd_worker_pool\n",
        text,
        count=1,
        flags=re.M,
    )
    if imports != 1:
        raise SystemExit("tfsd-worker: generated code has no descriptor_pool import to follow")
    # The full module names the builder records (used by pickling and reprs).
    text = re.sub(
        r"(BuildTopDescriptorsAndMessages\(DESCRIPTOR, ')((?:tensorflow|tfsd)\.)",
        rf"\1{PACKAGE}.\2",
        text,
    )
    if re.search(r"^(import|from) tensorflow\b", text, flags=re.M):
        raise SystemExit("tfsd-worker: generated code still imports the tensorflow package")
    return text


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
            *PROTOS,
        ],
        check=True,
    )
    (out / "__init__.py").write_text(POOL_MODULE)
    for proto in PROTOS:
        package = out
        for part in Path(proto).parent.parts:
            package = package / part
            (package / "__init__.py").touch()
        module = out / proto.replace(".proto", "_pb2.py")
        text = module.read_text()
        check_gencode(text)
        module.write_text(rewrite(text))


class BuildWithStubs(build_py):
    def run(self) -> None:
        super().run()
        generate(Path(self.build_lib) / "tfsd_worker" / "_gen")


setup(cmdclass={"build_py": BuildWithStubs})

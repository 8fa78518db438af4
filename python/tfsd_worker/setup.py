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
        module.write_text(rewrite(module.read_text()))


class BuildWithStubs(build_py):
    def run(self) -> None:
        super().run()
        generate(Path(self.build_lib) / "tfsd_worker" / "_gen")


setup(cmdclass={"build_py": BuildWithStubs})

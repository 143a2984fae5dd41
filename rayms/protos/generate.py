"""Regenerate ``inference_pb2.py`` and ``inference_pb2_grpc.py`` from ``inference.proto``.

    python -m rayms.protos.generate            # rewrites the two modules next to this file
    python -m rayms.protos.generate --check    # exit 1 when the committed modules differ

Needs grpcio-tools (in the ``test`` extra). The one change made to protoc's output: the messages are built in a
descriptor pool of their own instead of protobuf's default pool (see the package docstring for why).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent  # the folder holding the rayms package: protoc names modules from it
PROTO = "rayms/protos/inference.proto"
MODULES = ("inference_pb2.py", "inference_pb2_grpc.py")
DEFAULT_POOL = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
OWN_POOL = ("# rayms: a pool of its own, so tritonclient's and KServe's messages of the same names can be imported too.\n"
            "POOL = _descriptor_pool.DescriptorPool()\n"
            "DESCRIPTOR = POOL.AddSerializedFile(")


def generate() -> dict[str, str]:
    """The two modules' text as protoc writes them, with the pool changed."""
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT}", f"--python_out={out}",
                        f"--grpc_python_out={out}", str(ROOT / PROTO)], check=True)
        texts = {name: (Path(out) / "rayms" / "protos" / name).read_text() for name in MODULES}
    if texts["inference_pb2.py"].count(DEFAULT_POOL) != 1:
        raise RuntimeError("protoc's output no longer registers the file in the default pool as expected; "
                           "update rayms/protos/generate.py")
    texts["inference_pb2.py"] = texts["inference_pb2.py"].replace(DEFAULT_POOL, OWN_POOL)
    return texts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare with the committed modules")
    args = parser.parse_args()
    stale = []
    for name, text in generate().items():
        path = HERE / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"out of date with {PROTO}: {', '.join(stale)}; run python -m rayms.protos.generate", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

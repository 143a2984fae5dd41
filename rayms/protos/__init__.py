"""The Open Inference Protocol's gRPC messages and service (``inference.GRPCInferenceService``).

``inference.proto`` is the schema; ``inference_pb2.py`` and ``inference_pb2_grpc.py`` are generated from it by
``python -m rayms.protos.generate`` (grpcio-tools, a development dependency) and committed, so installing rayms
needs no code generator. Do not edit the generated files by hand: ``tests/test_grpc_api.py`` regenerates them
and fails when they differ from the schema.

The messages live in a descriptor pool of their own (:data:`inference_pb2.POOL`), not in protobuf's default pool:
tritonclient and KServe register messages of the same names (``inference.ModelInferRequest``, ...) in the default
pool, and a second registration of a name fails, so a process may import rayms and either client together.
"""

"""The Open Inference Protocol over gRPC: a second front door onto the same data plane (docs/grpc.md).

Nothing here is imported by `create_app`: the generated modules (mnist_service/protos) register the
package `inference` in protobuf's default pool, as tritonclient.grpc's and kserve's do, and a process
that loads two copies fails ("duplicate symbol"). process/server.py imports `server` only in a worker
whose GRPC_PORT is set.
"""

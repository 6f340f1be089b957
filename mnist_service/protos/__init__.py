"""The .proto files the server serves and the Python modules generated from them (README.md here).

Import the generated modules only where they are needed, and never beside another copy of the
package `inference` (tritonclient.grpc, kserve): protobuf refuses a second definition of a symbol.
"""

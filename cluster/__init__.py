"""Serving hire: the gRPC server (grpc_server), its auth and metrics; Ray placement comes later."""

"""Generated gRPC modules for protos/*.proto (hire.v1.Inference, jetstream_proto.Orchestrator, and the
internal hire.internal.v1.Drafter and Verifier of the tandem coordinator).

Do not edit the *_pb2* files: change the .proto and run scripts/gen_protos.sh.
"""

"""Generated gRPC modules for protos/*.proto (hire.v1.Inference, jetstream_proto.Orchestrator).

Do not edit the *_pb2* files: change the .proto and run scripts/gen_protos.sh.
"""

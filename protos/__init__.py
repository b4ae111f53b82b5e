"""Generated gRPC stubs and the .proto wire contract (offsite.v1)."""

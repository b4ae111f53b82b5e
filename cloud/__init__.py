"""The model owner's coordinator: gRPC service, jobs and rounds, state, aggregation, evaluation."""

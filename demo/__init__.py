"""The embedded default demo: a small pretrained base, three data owners, one federated job."""

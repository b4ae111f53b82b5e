"""offsite: federated Offsite-Tuning. This package holds what the cloud and the client share."""

__version__ = "0.1.0"

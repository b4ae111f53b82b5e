"""Secure aggregation (Bonawitz et al., CCS 2017): the coordinator learns the sum of the clients'
updates and nothing about any one of them, even when clients drop out mid-protocol."""

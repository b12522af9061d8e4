"""Supervisor: the CA and its signer, configuration, and the gateway process that runs the workers."""

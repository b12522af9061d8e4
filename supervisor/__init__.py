"""Supervisor: the CA and its signer, configuration, the event hub, and the gateway
process that runs the workers."""

"""tlsgate: a TLS interception gateway that reports what it sees to an IDS.

Where things are: ``tlsgate.workers`` accepts, intercepts, validates and inspects
connections; ``tlsgate.supervisor`` holds the CA and runs the gateway;
``tlsgate.bpf`` steers connections across workers; ``tlsgate.loadtest`` measures it.
"""

__version__ = "0.1.0"

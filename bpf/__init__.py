"""eBPF connection steering across the workers' SO_REUSEPORT sockets (a sockmap program,
loaded with bcc)."""

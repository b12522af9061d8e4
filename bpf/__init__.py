"""eBPF connection steering across the workers' SO_REUSEPORT sockets (sockmap program, loaded with bcc)."""

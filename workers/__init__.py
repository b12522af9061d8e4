"""Workers: accept, read the ClientHello, decide policy, connect and validate upstream,
relay and inspect."""

"""The Switchboard node: Trio server, client wire protocol, gateway and core."""

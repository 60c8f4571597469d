"""The client side: startup, authentication and the relay."""

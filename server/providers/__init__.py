"""Where jobs run: local batchers now, cloud providers later; one interface."""

"""Spillway's HTTP server: routes know nothing of torch; pipelines know nothing of HTTP."""

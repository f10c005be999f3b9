"""GPU work only: no HTTP, no asyncio, no settings object."""

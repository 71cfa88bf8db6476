"""Real test servers and their pytest fixtures (see scripted_server.py)."""

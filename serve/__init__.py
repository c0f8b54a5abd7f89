"""ferray's Ray Serve application (serve/app.py) and its deploy config (serve/config.yaml)."""

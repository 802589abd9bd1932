"""plait's version: one definition, read by the package, pyproject.toml and every record that
names the version it was made with (artifacts, runs, the server's /healthz)."""

__version__ = "0.1.0"

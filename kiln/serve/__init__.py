"""`kiln serve`: the REST API over jobs (docs/serve.md)."""

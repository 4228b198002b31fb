"""The REST API's routers, one module per resource (docs/serve.md): `health` (open), then
`configs`, `jobs`, `metrics` (and the event stream), `checkpoints`, all behind the token check
that `kiln.serve.app.create_app` declares once when it includes them. `common` holds what they
share: the app state as dependencies, the token check, the error schema."""

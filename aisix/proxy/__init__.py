"""The data plane: the road one request takes. :mod:`.routes` (every client route) →
:mod:`.handlers` (auth, model checks, routing with retries and fallbacks, hooks, the upstream
call, whole or streamed) with :mod:`.messages`, :mod:`.responses`, :mod:`.completions` for the
other client APIs; :mod:`.stream` (the sans-IO relay), :mod:`.routing` (deployments' choice and
health), :mod:`.upstream_errors` (transport failures → client errors), :mod:`.redact`."""

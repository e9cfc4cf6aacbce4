"""The control plane: the Admin API (:mod:`.api`) and the OpenAPI document of every route
(:mod:`.openapi`, :mod:`.openapi_entry`)."""

"""The transports to upstream providers, with their own error taxonomy (:mod:`.errors`): pooled
keep-alive connections (:mod:`.pool`: aiohttp for https, :mod:`.raw` for http), the in-process
``mock://`` upstream (:mod:`.mock`), and the upstream-failure log (:mod:`.log`)."""

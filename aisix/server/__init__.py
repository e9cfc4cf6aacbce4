"""The HTTP servers of one gateway process: the apps (:mod:`.app`), the measuring and
error-envelope middleware (:mod:`.middleware`), the protocol layer (:mod:`.protocol`), CORS
(:mod:`.cors`) and the process's start and stop (:mod:`.lifecycle`)."""

"""What the gateway is told: the config file (:mod:`.loader`), the resource schemas
(:mod:`.resources`), the immutable view the proxy reads (:mod:`.snapshot`) and the stores that
keep models and keys (:mod:`.store`)."""

"""Around each provider call: the hook pipeline (:mod:`.pipeline`) and the rate limiter, on this
process's counters (:mod:`.ratelimit`) or shared through Redis (:mod:`.ratelimit_redis`)."""

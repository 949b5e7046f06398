"""Shielding the upstream: one request per key, a concurrency cap, backoff on 429/503, a breaker.

* :class:`~proxy.shield.coalescer.Coalescer` runs one fetch per cache key; concurrent identical
  misses wait for it and share its outcome, error included, with no time-out that would send
  them upstream anyway.
* :class:`~proxy.shield.limiter.Limiter` caps concurrent upstream requests (and optionally their
  rate, with a :class:`~proxy.shield.bucket.TokenBucket`); a request that waits longer than the
  queue time-out is refused with 503 and ``Retry-After``. When the upstream says it is
  overloaded (429/503 with ``Retry-After``), every upstream request of the gateway waits until
  then, not only the one that was told.
* :class:`~proxy.shield.breaker.Breaker` opens after repeated upstream failures, refuses at once
  during a cool-down, then lets one probe through and closes again when it succeeds. Only
  evidence that the upstream is unwell counts
  (:func:`~proxy.shield.breaker.counts_against_upstream`), once per client request.
* :class:`~proxy.shield.prober.Prober` asks the upstream a cheap question while the circuit is
  open, soon and then less often, and closes the circuit as soon as it answers.
* :mod:`proxy.shield.retry` says when and how soon a read is sent again after 429/503, and
  :class:`~proxy.shield.policy.ShieldPolicy` gathers what the cache's serving path needs.
* :class:`~proxy.shield.counters.ShieldCounters` counts what all of them did.

All of this is per gateway process unless ``redis_url`` is set: then
:mod:`proxy.shield.shared` holds the limits, flights and breaker state for every worker and
replica in Redis. Import from the submodules: this package re-exports nothing.
"""

"""What a request cost, in USD: a deployment's own ``pricing``, else the price table of
``genai-prices`` (pydantic's package; its table ships inside each release, so it is looked up
offline; a newer release of the package brings newer prices). Unknown price: no cost, never a guess.

Token prices only (USD per million tokens): prompt tokens not from the cache at the input rate,
cached ones at the cache-read rate, tokens written to the cache at the cache-write rate,
completion tokens (reasoning included: OpenAI, Anthropic and Gemini bill it as output) at the
output rate, plus a per-request fee where the table has one. Tiers follow the table's rule: past a
tier's start (prompt tokens of the request) its rate applies to all tokens of that kind. Web
search, audio and image fees are not counted; a table entry with a separate reasoning rate is
taken as unknown (the gateway does not see the split). Time-of-day prices (DeepSeek's off-peak
hours) are taken at the request's start.
"""
from __future__ import annotations

import ipaddress
import logging
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

from aisix.config.resources import Model, Pricing

log = logging.getLogger("aisix.pricing")

#: aisix provider → the price table's provider id (used when ``api_base`` is the provider's own).
TABLE_PROVIDERS = {"openai": "openai", "deepseek": "deepseek", "anthropic": "anthropic", "gemini": "google"}
#: The table's price keys that are token or request prices the gateway can count.
_COUNTED = {"input_mtok", "output_mtok", "cache_read_mtok", "cache_write_mtok", "requests_kcount"}
#: Price keys whose presence makes a price unknown to the gateway (it can't split the tokens).
_UNSPLIT = {"output_reasoning_mtok"}


@dataclass(frozen=True, slots=True)
class Rate:
    """USD per million tokens: ``base``, or the rate of the last tier whose start (prompt tokens) is passed."""

    base: float
    tiers: tuple[tuple[int, float], ...] = ()  # (start, rate), ascending

    def at(self, prompt_tokens: int) -> float:
        for start, rate in reversed(self.tiers):
            if prompt_tokens > start:
                return rate
        return self.base


@dataclass(frozen=True, slots=True)
class Price:
    """One deployment's prices. :meth:`cost` → USD."""

    input: Rate
    output: Rate
    cached_input: Rate
    cache_write: Rate
    per_request: float = 0.0  # USD

    def cost(self, prompt: int, completion: int, cached: int = 0, cache_write: int = 0) -> float:
        """USD for one request's tokens (``cached`` and ``cache_write`` are part of ``prompt``)."""
        fresh = max(prompt - cached - cache_write, 0)
        return (fresh * self.input.at(prompt) + cached * self.cached_input.at(prompt)
                + cache_write * self.cache_write.at(prompt) + completion * self.output.at(prompt)) / 1e6 \
            + self.per_request


def from_pricing(p: Pricing) -> Price:
    """A model's own ``pricing`` as a :class:`Price`."""
    i = Rate(p.input_per_million)
    return Price(i, Rate(p.output_per_million),
                 i if p.cached_input_per_million is None else Rate(p.cached_input_per_million),
                 i if p.cache_write_per_million is None else Rate(p.cache_write_per_million))


def _rate(value) -> Rate | None:
    if value is None:
        return None
    tiers = getattr(value, "tiers", None)
    if tiers is None:
        return Rate(float(value))
    return Rate(float(value.base), tuple((int(t.start), float(t.price)) for t in tiers))


def from_table(model_price) -> Price | None:
    """A ``genai_prices`` ``ModelPrice`` as a :class:`Price`; None if it prices what the gateway
    can't count apart (a separate reasoning rate) or has no input/output rate."""
    keys = {k for k, v in vars(model_price).items() if v is not None and not k.startswith("_")}
    if keys & _UNSPLIT or not keys & {"input_mtok", "output_mtok"}:
        return None
    zero = Rate(0.0)
    i = _rate(getattr(model_price, "input_mtok", None)) or zero
    fee = getattr(model_price, "requests_kcount", None)
    return Price(i, _rate(getattr(model_price, "output_mtok", None)) or zero,
                 _rate(getattr(model_price, "cache_read_mtok", None)) or i,
                 _rate(getattr(model_price, "cache_write_mtok", None)) or i,
                 float(fee) / 1000 if fee is not None else 0.0)


class Prices:
    """Prices of deployments (one-upstream :class:`~aisix.config.resources.Model` targets), looked up once
    each and kept. ``use_table``: look up models without ``pricing`` in genai-prices (~0.2 s and
    ~30 MB per process: loaded by :meth:`preload` when a model may be in it, else on first use)."""

    def __init__(self, use_table: bool = True):
        self.use_table = use_table
        self._own: dict[tuple, Price] = {}
        self._found: dict[tuple, object] = {}  # (provider, model id, api_base) → the table's ModelInfo, or None
        self._converted: dict[int, tuple[object, Price | None]] = {}  # id(ModelPrice) → (it, Price)

    def preload(self, models) -> None:
        """Load the table on a thread if one of ``models`` (or their deployments) may be priced by
        it, so that its first lookup does not hold the event loop; a gateway whose models all have
        ``pricing`` or run on local servers never loads it."""
        if self.use_table and any(in_table_scope(t) for m in models for t in m.targets):
            threading.Thread(target=_snapshot, name="aisix-price-table", daemon=True).start()

    def price(self, target: Model, when_ns: int) -> Price | None:
        """``target``'s price at ``when_ns`` (epoch ns), or None when it is unknown."""
        own = target.pricing
        if own is not None:
            key = (own.input_per_million, own.output_per_million, own.cached_input_per_million,
                   own.cache_write_per_million)
            p = self._own.get(key)
            if p is None:
                p = self._own[key] = from_pricing(own)
            return p
        if not self.use_table:
            return None
        key = (target.provider, target.model_id, target.provider_config.api_base)
        info = self._found.get(key, self)
        if info is self:  # the scope depends on the key only: checked once, with the lookup
            info = self._found[key] = _lookup(*key) if in_table_scope(target) else None
        if info is None:
            return None
        mp = info.get_prices(datetime.fromtimestamp(when_ns / 1e9, UTC))
        hit = self._converted.get(id(mp))
        if hit is None or hit[0] is not mp:
            hit = self._converted[id(mp)] = (mp, from_table(mp))
        return hit[1]


def in_table_scope(target: Model) -> bool:
    """Whether the table may price ``target``: no ``pricing`` of its own, not ``mock``, and not on
    a loopback or private address (a server of one's own is in no price table)."""
    if target.pricing is not None or target.provider == "mock":
        return False
    base = target.provider_config.api_base
    if base is None:
        return True
    host = urlsplit(base).hostname or ""
    if host == "localhost":
        return False
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return True
    return not (ip.is_loopback or ip.is_private or ip.is_link_local)


def _snapshot():
    from genai_prices.data_snapshot import get_snapshot
    return get_snapshot()


def _lookup(provider: str, model_id: str, api_base: str | None):
    """The table's entry for ``model_id`` at ``provider`` (or, with an ``api_base`` that is not the
    provider's own, at the table's provider whose API URL matches it); None when there is none."""
    from aisix.providers import get_provider
    own_base = get_provider(provider).default_api_base if provider in TABLE_PROVIDERS else None
    if api_base is None or (own_base and api_base.rstrip("/") == own_base.rstrip("/")):
        provider_id, url = TABLE_PROVIDERS.get(provider), None
        if provider_id is None:
            return None
    else:
        provider_id, url = None, api_base
    try:
        _, info = _snapshot().find_provider_model(model_id, None, provider_id, url)
    except LookupError:
        return None
    return info

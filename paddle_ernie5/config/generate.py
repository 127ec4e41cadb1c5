"""The `generate` section: settings of sampling with a KV cache (model/generation.py `generate`,
`ernie5 generate --text`): the KV-cache eviction done once at the end of the prompt's prefill."""

from __future__ import annotations

from dataclasses import dataclass

from ._check import _check

KV_POLICIES = ("nacl", "recent", "random")


@dataclass(frozen=True, kw_only=True)
class GenerateConfig:
    # Share of the prompt's P keys kept per layer and kv head after the prefill: ceil(kv_budget * P)
    # (model/kv_eviction.py); 1 keeps the whole cache and evicts nothing.
    kv_budget: float = 1.0
    # nacl: proxy-token scores + random keep (NACL); recent: the last positions of the prompt;
    # random: a uniform sample of positions (both baselines seeded like nacl).
    kv_policy: str = "nacl"
    # NACL: the prompt's last tokens act as proxies (the question of a long-context prompt); their
    # attention, summed over them and over the query heads of a kv head, scores every key. The
    # released NACL code uses 1% of the input; a count is steadier for short prompts.
    nacl_proxy_tokens: int = 32
    # NACL: share of the budget left after the proxies that random eviction fills (the rest keeps
    # the top-scored keys). The released defaults keep 12% + 7% of the input: 7/19 ~ 0.37.
    nacl_random_share: float = 0.35
    nacl_seed: int = 0  # the random keep (and the random baseline) draw from (seed, layer)

    def validate(self, at: str = "generate") -> GenerateConfig:
        _check(
            at,
            "kv_budget",
            self.kv_budget,
            0 < self.kv_budget <= 1,
            "a fraction 0 < kv_budget <= 1 of the prompt's keys kept per layer and kv head "
            "(1 keeps the whole cache)",
        )
        _check(
            at, "kv_policy", self.kv_policy, self.kv_policy in KV_POLICIES, f"one of {KV_POLICIES}"
        )
        _check(at, "nacl_proxy_tokens", self.nacl_proxy_tokens, self.nacl_proxy_tokens >= 1, ">= 1")
        _check(
            at,
            "nacl_random_share",
            self.nacl_random_share,
            0 <= self.nacl_random_share <= 1,
            "0 <= nacl_random_share <= 1",
        )
        _check(at, "nacl_seed", self.nacl_seed, self.nacl_seed >= 0, ">= 0")
        return self

"""What one candidate of a call may cost, and the output bound that keeps it there.

The budget holds a call at the most it can cost: its prompt plus, per choice,
the caller's ``max_tokens`` / ``max_completion_tokens`` or, without one, the
model's full output (:attr:`Deployment.max_output_tokens`). When a limit (the
tier's per-call cap, then what is left of the tenant's day) cannot pay that,
:meth:`Fit.lower` lowers the output to the most the limit pays for, and the
gateway asks the provider for no more (:attr:`Fit.bound`, sent in the field
the model takes). A limit that cannot pay :data:`MIN_REPLY_TOKENS` a choice
refuses the candidate. A model whose output is free is never bounded.

Arithmetic is the estimator's: prices in pico-USD per token, cost in nano-USD
rounded up, so ``cost(out) <= limit`` exactly when ``out <= affordable``.
"""

from __future__ import annotations

__all__ = ["MIN_REPLY_TOKENS", "Fit"]

# The smallest reply per choice worth sending a call for: a limit that pays for less
# refuses the call instead of bounding it to a useless stub.
MIN_REPLY_TOKENS = 16


class Fit:
    """One candidate's output per choice (:attr:`out`) and cost bound (:attr:`cost`)."""

    __slots__ = ("choices", "cost", "full", "out", "price_in", "price_out", "prompt_tokens")

    def __init__(self, prompt_tokens: int, price: tuple[int, int] | None, full: int,
                 choices: int) -> None:
        self.prompt_tokens = prompt_tokens
        # A model with no price costs nothing to the gateway's books.
        self.price_in, self.price_out = price if price is not None else (0, 0)
        self.full = full  # the output the request implies, per choice: never raised
        self.choices = choices
        self.out = full
        self.cost = self._cost(full)

    def _cost(self, out: int) -> int:
        pico = self.prompt_tokens * self.price_in + out * self.choices * self.price_out
        return -(-pico // 1000)

    @property
    def bound(self) -> int:
        """Output tokens per choice to ask the provider for; 0: the request stands."""
        return self.out if self.out < self.full else 0

    def lower(self, limit_nanousd: int) -> bool:
        """Lower the output so the call costs at most ``limit_nanousd``; False when not
        even :data:`MIN_REPLY_TOKENS` a choice (or the prompt alone) fit, and then
        nothing changes."""
        if self.cost <= limit_nanousd:
            return True
        room = limit_nanousd * 1000 - self.prompt_tokens * self.price_in
        if room < 0 or self.price_out == 0:
            return False
        out = room // (self.price_out * self.choices)
        if out < MIN_REPLY_TOKENS:
            return False
        self.out = out
        self.cost = self._cost(out)
        return True

    def least(self) -> int:
        """What the smallest reply worth sending costs: the refusal's figure."""
        return self._cost(min(self.full, MIN_REPLY_TOKENS))

    def cost_at(self, out: int) -> int:
        """What the call costs with ``out`` output tokens a choice (at most :attr:`out`)."""
        return self._cost(min(out, self.out))

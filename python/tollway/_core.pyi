"""Typed stubs for the Rust extension ``tollway._core`` (rust_core/src/py.rs)."""

__version__: str

# ==== BEGIN tokenizer + cost stubs ====
# ==== END tokenizer + cost stubs ====
# ==== BEGIN limiter + breaker stubs ====
# ==== END limiter + breaker stubs ====

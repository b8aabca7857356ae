//! Every pyo3 binding of the crate, and nothing else: the logic lives in the
//! plain-Rust modules so `cargo test` needs no interpreter.

use pyo3::prelude::*;

// ==== BEGIN tokenizer + cost bindings ====
// ==== END tokenizer + cost bindings ====

// ==== BEGIN limiter + breaker bindings ====
// ==== END limiter + breaker bindings ====

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    // ==== BEGIN tokenizer + cost registration ====
    // ==== END tokenizer + cost registration ====
    // ==== BEGIN limiter + breaker registration ====
    // ==== END limiter + breaker registration ====
    Ok(())
}

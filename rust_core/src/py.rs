//! Every pyo3 binding of the crate, and nothing else: the logic lives in the
//! plain-Rust modules so `cargo test` needs no interpreter.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

pyo3::create_exception!(
    tollway._core,
    CoreError,
    PyRuntimeError,
    "A bug in the Rust core (a panic), caught where Python called in."
);

/// Runs `f`, a call into the plain-Rust core, turning a panic into `CoreError`.
///
/// Left to pyo3, a panic is raised as its `PanicException`, a `BaseException`
/// that passes every `except Exception`: the request would end with no error
/// envelope and no record. Going on after a panic is sound here: the limiter and
/// breaker take their locks through `PoisonError::into_inner`, so at worst one
/// key's buckets or one breaker keep a half-made update, and the tokenizer and
/// the price table are only read; one call failing beats a gateway that stops.
fn caught<T>(f: impl FnOnce() -> T) -> PyResult<T> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|payload| {
        CoreError::new_err(format!("tollway core panicked: {}", panic_text(payload.as_ref())))
    })
}

fn panic_text(payload: &(dyn Any + Send)) -> &str {
    match payload.downcast_ref::<&str>() {
        Some(text) => text,
        None => payload
            .downcast_ref::<String>()
            .map_or("(no message)", String::as_str),
    }
}

/// Test-only: a real panic inside the boundary, so tests can put one in the path of
/// a call and check that it ends as tollway's internal error.
#[pyfunction(name = "_panic")]
fn test_panic(message: &str) -> PyResult<()> {
    caught(|| panic!("{message}"))
}

/// Token counter and cost estimator bindings. Strings are read from the
/// Python objects under the GIL; counting a large text releases it.
mod tokens_cost {
    use std::borrow::Cow;

    use pyo3::exceptions::{PyKeyError, PyTypeError, PyValueError};
    use pyo3::prelude::*;
    use pyo3::types::{PyBytes, PyDict, PyList, PyString};

    use crate::cost::{parse_usd_per_mtok, CostEstimator, Price, UnknownModel};
    use crate::tokenizer::chat::ChatPrompt;
    use crate::tokenizer::{encoding_for_model, Encoding};

    use super::caught;

    /// Below this much text, releasing and re-taking the GIL costs more than
    /// other threads gain from it.
    const DETACH_MIN_BYTES: usize = 8 * 1024;

    pyo3::create_exception!(
        tollway._core,
        UnknownModelError,
        PyKeyError,
        "The model has no price in the estimator's table."
    );

    fn unknown_model(err: UnknownModel) -> PyErr {
        UnknownModelError::new_err(format!(
            "{err}; add it to the price table or call set_price()"
        ))
    }

    fn encoding(name: &str) -> PyResult<Encoding> {
        Encoding::from_name(name).ok_or_else(|| {
            PyValueError::new_err(format!(
                "unknown encoding {name:?}: expected \"o200k_base\" or \"cl100k_base\""
            ))
        })
    }

    /// Runs `f` without the GIL when it is long: a large text, or the first
    /// use of an encoding (parsing its file takes tens of milliseconds).
    fn maybe_detached<T: Send>(
        py: Python<'_>,
        text_bytes: usize,
        enc: Encoding,
        f: impl FnOnce() -> T + Send,
    ) -> PyResult<T> {
        if text_bytes >= DETACH_MIN_BYTES || !enc.is_loaded() {
            py.detach(|| caught(f))
        } else {
            caught(f)
        }
    }

    /// The text as UTF-8. A str with lone surrogates has none, and tiktoken
    /// then counts it round-tripped through UTF-16 with replacement (a pair
    /// becomes its character, a lone one U+FFFD); so does this.
    fn text_of<'a>(text: &'a Bound<'_, PyString>) -> PyResult<Cow<'a, str>> {
        if let Ok(s) = text.to_str() {
            return Ok(Cow::Borrowed(s));
        }
        let utf16 = text.call_method1("encode", ("utf-16", "surrogatepass"))?;
        let replaced = utf16.call_method1("decode", ("utf-16", "replace"))?;
        Ok(Cow::Owned(
            replaced.cast::<PyString>()?.to_str()?.to_owned(),
        ))
    }

    #[pyfunction]
    #[pyo3(signature = (text, encoding = "o200k_base"))]
    fn count_tokens(py: Python<'_>, text: &Bound<'_, PyString>, encoding: &str) -> PyResult<usize> {
        let enc = self::encoding(encoding)?;
        let text = text_of(text)?;
        maybe_detached(py, text.len(), enc, || enc.count(&text))
    }

    #[pyfunction]
    #[pyo3(signature = (text, encoding = "o200k_base"))]
    fn encode_ordinary(
        py: Python<'_>,
        text: &Bound<'_, PyString>,
        encoding: &str,
    ) -> PyResult<Vec<u32>> {
        let enc = self::encoding(encoding)?;
        let text = text_of(text)?;
        maybe_detached(py, text.len(), enc, || enc.encode_ordinary(&text))
    }

    #[pyfunction]
    fn encoding_file<'py>(py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyBytes>> {
        Ok(PyBytes::new(py, encoding(name)?.file()))
    }

    #[pyfunction(name = "encoding_for_model")]
    fn encoding_for_model_name(model: &str) -> &'static str {
        encoding_for_model(model).name()
    }

    fn str_of(value: &Bound<'_, PyAny>) -> PyResult<Option<String>> {
        match value.cast::<PyString>() {
            Ok(s) => Ok(Some(text_of(s)?.into_owned())),
            Err(_) => Ok(None),
        }
    }

    fn dict_str(dict: &Bound<'_, PyDict>, key: &str) -> PyResult<Option<String>> {
        match dict.get_item(key)? {
            Some(value) => str_of(&value),
            None => Ok(None),
        }
    }

    fn dict_dict<'py>(
        dict: &Bound<'py, PyDict>,
        key: &str,
    ) -> PyResult<Option<Bound<'py, PyDict>>> {
        Ok(dict
            .get_item(key)?
            .and_then(|v| v.cast_into::<PyDict>().ok()))
    }

    fn dicts<'py>(value: &Bound<'py, PyAny>, what: &str) -> PyResult<Vec<Bound<'py, PyDict>>> {
        if value.is_instance_of::<PyString>() {
            return Err(PyTypeError::new_err(format!(
                "{what} must be a list of objects"
            )));
        }
        value
            .try_iter()?
            .map(|item| {
                item?
                    .cast_into::<PyDict>()
                    .map_err(|_| PyTypeError::new_err(format!("each of {what} must be an object")))
            })
            .collect()
    }

    fn read_messages(messages: &Bound<'_, PyAny>, prompt: &mut ChatPrompt<'_>) -> PyResult<()> {
        for message in dicts(messages, "messages")? {
            prompt.message();
            for (key, value) in message.iter() {
                let key = key.str()?;
                let key = key.to_str()?;
                if let Some(text) = str_of(&value)? {
                    prompt.string_field(key, text);
                } else if key == "content" {
                    if let Ok(parts) = value.cast::<PyList>() {
                        read_parts(parts, prompt)?;
                    }
                } else if key == "tool_calls" && value.is_instance_of::<PyList>() {
                    for call in dicts(&value, "tool_calls")? {
                        let function = match dict_dict(&call, "function")? {
                            Some(f) => Some(f),
                            None => dict_dict(&call, "custom")?,
                        };
                        if let Some(f) = function {
                            read_tool_call(&f, prompt)?;
                        }
                    }
                } else if key == "function_call" {
                    // The deprecated single call that tool_calls replaced.
                    if let Ok(f) = value.cast::<PyDict>() {
                        read_tool_call(f, prompt)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn read_tool_call(function: &Bound<'_, PyDict>, prompt: &mut ChatPrompt<'_>) -> PyResult<()> {
        let arguments = match dict_str(function, "arguments")? {
            Some(a) => a,
            None => dict_str(function, "input")?.unwrap_or_default(),
        };
        prompt.tool_call(dict_str(function, "name")?.unwrap_or_default(), arguments);
        Ok(())
    }

    fn read_parts(parts: &Bound<'_, PyList>, prompt: &mut ChatPrompt<'_>) -> PyResult<()> {
        for part in parts.iter() {
            let Ok(part) = part.cast_into::<PyDict>() else {
                continue;
            };
            match dict_str(&part, "type")?.as_deref() {
                Some("text") => prompt.text_part(dict_str(&part, "text")?.unwrap_or_default()),
                Some("refusal") => {
                    prompt.text_part(dict_str(&part, "refusal")?.unwrap_or_default())
                }
                Some("image_url") => {
                    let detail = match dict_dict(&part, "image_url")? {
                        Some(image) => dict_str(&image, "detail")?,
                        None => None,
                    };
                    prompt.image_part(detail.as_deref());
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn read_tools(tools: &Bound<'_, PyAny>, prompt: &mut ChatPrompt<'_>) -> PyResult<()> {
        for tool in dicts(tools, "tools")? {
            // {"type": "function", "function": {...}}, a custom tool, or a
            // bare function of the deprecated `functions` parameter.
            let function = match (dict_dict(&tool, "function")?, dict_dict(&tool, "custom")?) {
                (Some(f), _) | (None, Some(f)) => f,
                (None, None) if tool.contains("name")? => tool,
                (None, None) => continue,
            };
            let name = dict_str(&function, "name")?.unwrap_or_default();
            let description = dict_str(&function, "description")?.unwrap_or_default();
            prompt.function(&name, &description);
            let properties = match dict_dict(&function, "parameters")? {
                Some(parameters) => dict_dict(&parameters, "properties")?,
                None => None,
            };
            if let Some(properties) = properties.filter(|p| !p.is_empty()) {
                prompt.properties();
                read_properties(&properties, prompt, 0)?;
            }
        }
        Ok(())
    }

    /// JSON schemas nest; deeper than this is not a real tool definition.
    const MAX_SCHEMA_DEPTH: usize = 16;

    fn read_properties(
        properties: &Bound<'_, PyDict>,
        prompt: &mut ChatPrompt<'_>,
        depth: usize,
    ) -> PyResult<()> {
        if depth > MAX_SCHEMA_DEPTH {
            return Err(PyValueError::new_err("tool parameters nest too deeply"));
        }
        for (name, schema) in properties.iter() {
            let name = name.str()?;
            let Ok(schema) = schema.cast_into::<PyDict>() else {
                continue;
            };
            let kind = match schema.get_item("type")? {
                Some(kind) if kind.is_instance_of::<PyList>() => {
                    let kinds: Vec<String> = kind.extract().unwrap_or_default();
                    kinds.join("|")
                }
                Some(kind) => str_of(&kind)?.unwrap_or_default(),
                None => String::new(),
            };
            let description = dict_str(&schema, "description")?.unwrap_or_default();
            prompt.property(name.to_str()?, &kind, &description);
            if let Some(items) = schema.get_item("enum")? {
                let items: Vec<String> = items
                    .try_iter()?
                    .map(|item| item.and_then(|i| Ok(i.str()?.to_str()?.to_owned())))
                    .collect::<PyResult<_>>()?;
                prompt.enum_items(items);
            }
            let nested = match dict_dict(&schema, "items")? {
                Some(items) => dict_dict(&items, "properties")?,
                None => dict_dict(&schema, "properties")?,
            };
            if let Some(nested) = nested {
                read_properties(&nested, prompt, depth + 1)?;
            }
        }
        Ok(())
    }

    fn chat_prompt(
        messages: &Bound<'_, PyAny>,
        tools: &[Option<Bound<'_, PyAny>>],
    ) -> PyResult<ChatPrompt<'static>> {
        let mut prompt = ChatPrompt::new();
        read_messages(messages, &mut prompt)?;
        for tools in tools.iter().flatten().filter(|t| !t.is_none()) {
            read_tools(tools, &mut prompt)?;
        }
        Ok(prompt)
    }

    fn count_prompt(py: Python<'_>, prompt: &ChatPrompt<'static>, enc: Encoding) -> PyResult<u64> {
        maybe_detached(py, prompt.text_bytes(), enc, || prompt.count(enc))
    }

    #[pyfunction]
    #[pyo3(signature = (messages, model, tools = None))]
    fn count_chat_tokens(
        py: Python<'_>,
        messages: &Bound<'_, PyAny>,
        model: &str,
        tools: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<u64> {
        let prompt = chat_prompt(messages, &[tools.cloned()])?;
        count_prompt(py, &prompt, encoding_for_model(model))
    }

    #[pyclass(frozen, eq, hash, get_all, name = "Estimate", module = "tollway._core")]
    #[derive(Clone, Copy, PartialEq, Eq, Hash)]
    pub struct PyEstimate {
        prompt_tokens: u64,
        max_output_tokens: u64,
        max_cost_nanousd: u64,
    }

    #[pymethods]
    impl PyEstimate {
        #[new]
        fn new(prompt_tokens: u64, max_output_tokens: u64, max_cost_nanousd: u64) -> Self {
            PyEstimate {
                prompt_tokens,
                max_output_tokens,
                max_cost_nanousd,
            }
        }

        fn __repr__(&self) -> String {
            format!(
                "Estimate(prompt_tokens={}, max_output_tokens={}, max_cost_nanousd={})",
                self.prompt_tokens, self.max_output_tokens, self.max_cost_nanousd
            )
        }
    }

    impl From<crate::cost::Estimate> for PyEstimate {
        fn from(e: crate::cost::Estimate) -> Self {
            PyEstimate {
                prompt_tokens: e.prompt_tokens,
                max_output_tokens: e.max_output_tokens,
                max_cost_nanousd: e.max_cost_nanousd,
            }
        }
    }

    /// A USD-per-Mtok price given as int, float, Decimal or str, exactly:
    /// a float goes through its shortest repr ("0.15"), not its binary value.
    fn usd_per_mtok(value: &Bound<'_, PyAny>) -> PyResult<u64> {
        if value.is_instance_of::<pyo3::types::PyBool>() {
            return Err(PyTypeError::new_err("a price must be a number, not a bool"));
        }
        parse_usd_per_mtok(value.str()?.to_str()?).map_err(|e| PyValueError::new_err(e.to_string()))
    }

    fn price_of(entry: &Bound<'_, PyAny>, model: &str) -> PyResult<Price> {
        let field = |key: &str| -> PyResult<u64> {
            let value = entry
                .get_item(key)
                .map_err(|_| PyValueError::new_err(format!("price of {model:?} has no {key}")))?;
            usd_per_mtok(&value)
        };
        Ok(Price {
            input_picousd_per_token: field("input_usd_per_mtok")?,
            output_picousd_per_token: field("output_usd_per_mtok")?,
        })
    }

    fn optional_u64(request: &Bound<'_, PyAny>, key: &str) -> PyResult<Option<u64>> {
        match request.get_item(key) {
            Ok(value) if !value.is_none() => value.extract().map(Some).map_err(|_| {
                PyValueError::new_err(format!("{key} must be a non-negative integer"))
            }),
            _ => Ok(None),
        }
    }

    /// Prices per model and the pre-call bound of a request's cost; safe to
    /// share between threads. Unknown models raise UnknownModelError.
    #[pyclass(frozen, name = "CostEstimator", module = "tollway._core")]
    pub struct PyCostEstimator(CostEstimator);

    #[pymethods]
    impl PyCostEstimator {
        #[new]
        #[pyo3(signature = (prices, *, default_max_output_tokens = 1024))]
        fn new(prices: &Bound<'_, PyAny>, default_max_output_tokens: u64) -> PyResult<Self> {
            let mut table = Vec::new();
            for item in prices.call_method0("items")?.try_iter()? {
                let (model, entry): (String, Bound<'_, PyAny>) = item?.extract()?;
                let price = price_of(&entry, &model)?;
                table.push((model, price));
            }
            caught(|| PyCostEstimator(CostEstimator::new(table, default_max_output_tokens)))
        }

        #[getter]
        fn default_max_output_tokens(&self) -> u64 {
            self.0.default_max_output_tokens()
        }

        fn set_price(
            &self,
            model: &str,
            input_usd_per_mtok: &Bound<'_, PyAny>,
            output_usd_per_mtok: &Bound<'_, PyAny>,
        ) -> PyResult<()> {
            let price = Price {
                input_picousd_per_token: usd_per_mtok(input_usd_per_mtok)?,
                output_picousd_per_token: usd_per_mtok(output_usd_per_mtok)?,
            };
            caught(|| self.0.set_price(model, price))
        }

        /// (input, output) pico-USD per token, or None.
        fn price(&self, model: &str) -> PyResult<Option<(u64, u64)>> {
            caught(|| {
                self.0
                    .price(model)
                    .map(|p| (p.input_picousd_per_token, p.output_picousd_per_token))
            })
        }

        fn prices(&self) -> PyResult<Vec<(String, u64, u64)>> {
            caught(|| {
                self.0
                    .prices()
                    .into_iter()
                    .map(|(m, p)| (m, p.input_picousd_per_token, p.output_picousd_per_token))
                    .collect()
            })
        }

        fn estimate(
            &self,
            model: &str,
            prompt_tokens: u64,
            max_output_tokens: u64,
        ) -> PyResult<PyEstimate> {
            caught(|| self.0.estimate(model, prompt_tokens, max_output_tokens))?
                .map(Into::into)
                .map_err(unknown_model)
        }

        /// A chat request's bound: its prompt counted with the model's
        /// encoding, its output bounded by max_completion_tokens, max_tokens
        /// or the default, times n.
        fn estimate_chat(
            &self,
            py: Python<'_>,
            model: &str,
            request: &Bound<'_, PyAny>,
        ) -> PyResult<PyEstimate> {
            if caught(|| self.0.price(model))?.is_none() {
                return Err(unknown_model(UnknownModel(model.to_owned())));
            }
            let messages = request
                .get_item("messages")
                .map_err(|_| PyValueError::new_err("the request has no messages"))?;
            let tools = [
                request.get_item("tools").ok(),
                request.get_item("functions").ok(),
            ];
            let prompt = chat_prompt(&messages, &tools)?;
            let (completion, max, n) = (
                optional_u64(request, "max_completion_tokens")?,
                optional_u64(request, "max_tokens")?,
                optional_u64(request, "n")?,
            );
            let max_output = caught(|| self.0.max_output_tokens(completion, max, n))?;
            let prompt_tokens = count_prompt(py, &prompt, encoding_for_model(model))?;
            self.estimate(model, prompt_tokens, max_output)
        }

        /// An embeddings request's bound from its `input`: a string, a list
        /// of strings, or token arrays (a list of ints, or of lists of ints).
        fn estimate_embeddings(
            &self,
            py: Python<'_>,
            model: &str,
            input: &Bound<'_, PyAny>,
        ) -> PyResult<PyEstimate> {
            if caught(|| self.0.price(model))?.is_none() {
                return Err(unknown_model(UnknownModel(model.to_owned())));
            }
            let enc = encoding_for_model(model);
            let mut texts: Vec<String> = Vec::new();
            let mut given_tokens = 0u64;
            if let Some(text) = str_of(input)? {
                texts.push(text);
            } else {
                for item in input.try_iter()? {
                    let item = item?;
                    if let Some(text) = str_of(&item)? {
                        texts.push(text);
                    } else if item.is_instance_of::<PyList>() {
                        given_tokens += item.len()? as u64;
                    } else {
                        item.extract::<u64>().map_err(|_| {
                            PyTypeError::new_err("input must be a string, strings, or token arrays")
                        })?;
                        given_tokens += 1;
                    }
                }
            }
            let bytes = texts.iter().map(String::len).sum();
            let counted: usize =
                maybe_detached(py, bytes, enc, || texts.iter().map(|t| enc.count(t)).sum())?;
            self.estimate(model, counted as u64 + given_tokens, 0)
        }

        /// The actual cost in nano-USD of a call's usage.
        #[pyo3(signature = (model, prompt_tokens, completion_tokens = 0))]
        fn cost(&self, model: &str, prompt_tokens: u64, completion_tokens: u64) -> PyResult<u64> {
            caught(|| self.0.cost(model, prompt_tokens, completion_tokens))?
                .map_err(unknown_model)
        }
    }

    pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add_function(wrap_pyfunction!(count_tokens, m)?)?;
        m.add_function(wrap_pyfunction!(encode_ordinary, m)?)?;
        m.add_function(wrap_pyfunction!(encoding_file, m)?)?;
        m.add_function(wrap_pyfunction!(encoding_for_model_name, m)?)?;
        m.add_function(wrap_pyfunction!(count_chat_tokens, m)?)?;
        m.add_class::<PyEstimate>()?;
        m.add_class::<PyCostEstimator>()?;
        m.add("UnknownModelError", m.py().get_type::<UnknownModelError>())?;
        Ok(())
    }
}

/// Rate limiter and circuit breaker bindings. Kept in one private module so
/// their names can't collide with the other bindings in this file.
mod limiter_breaker {
    use std::sync::OnceLock;
    use std::time::Instant;

    use pyo3::exceptions::{PyKeyError, PyValueError};
    use pyo3::prelude::*;
    use pyo3::types::{PyDict, PyTuple};

    use crate::breaker::{BreakerConfig, CircuitBreaker, Snapshot, Transition};
    use crate::limiter::{Cost, Decision, Limits, RateLimiter, Tier, TierStatus};

    use super::caught;

    /// `time.monotonic()` at module import, and the `Instant` taken right
    /// after: both read CLOCK_MONOTONIC, so `now=None` in Rust gives the same
    /// timeline as a caller passing `time.monotonic()` itself.
    static CLOCK: OnceLock<(Instant, f64)> = OnceLock::new();

    pub fn init_clock(py: Python<'_>) -> PyResult<()> {
        let base: f64 = py.import("time")?.call_method0("monotonic")?.extract()?;
        let _ = CLOCK.set((Instant::now(), base));
        Ok(())
    }

    fn now_or_clock(now: Option<f64>) -> PyResult<f64> {
        match now {
            Some(t) if t.is_finite() => Ok(t),
            Some(t) => Err(PyValueError::new_err(format!("now must be finite, got {t}"))),
            None => {
                let (start, base) = CLOCK.get_or_init(|| (Instant::now(), 0.0));
                Ok(base + start.elapsed().as_secs_f64())
            }
        }
    }

    fn opt(limit: u64) -> Option<u64> {
        (limit != 0).then_some(limit)
    }

    fn fmt_opt(limit: u64) -> String {
        opt(limit).map_or_else(|| "None".to_owned(), |v| v.to_string())
    }

    /// Per-tier limits of a key; 0 or None disables a tier.
    #[pyclass(frozen, eq, hash, name = "Limits", module = "tollway._core")]
    #[derive(Clone, Copy, PartialEq, Eq, Hash)]
    pub struct PyLimits(pub Limits);

    #[pymethods]
    impl PyLimits {
        #[new]
        #[pyo3(signature = (
            per_minute = Some(Limits::DEFAULT.per_minute),
            per_hour = Some(Limits::DEFAULT.per_hour),
            per_day = Some(Limits::DEFAULT.per_day),
            expensive_per_hour = Some(Limits::DEFAULT.expensive_per_hour),
            tokens_per_minute = None,
        ))]
        fn new(
            per_minute: Option<u64>,
            per_hour: Option<u64>,
            per_day: Option<u64>,
            expensive_per_hour: Option<u64>,
            tokens_per_minute: Option<u64>,
        ) -> Self {
            PyLimits(Limits {
                per_minute: per_minute.unwrap_or(0),
                per_hour: per_hour.unwrap_or(0),
                per_day: per_day.unwrap_or(0),
                expensive_per_hour: expensive_per_hour.unwrap_or(0),
                tokens_per_minute: tokens_per_minute.unwrap_or(0),
            })
        }

        /// Every tier disabled.
        #[staticmethod]
        fn unlimited() -> Self {
            PyLimits(Limits::UNLIMITED)
        }

        #[getter]
        fn per_minute(&self) -> Option<u64> {
            opt(self.0.per_minute)
        }

        #[getter]
        fn per_hour(&self) -> Option<u64> {
            opt(self.0.per_hour)
        }

        #[getter]
        fn per_day(&self) -> Option<u64> {
            opt(self.0.per_day)
        }

        #[getter]
        fn expensive_per_hour(&self) -> Option<u64> {
            opt(self.0.expensive_per_hour)
        }

        #[getter]
        fn tokens_per_minute(&self) -> Option<u64> {
            opt(self.0.tokens_per_minute)
        }

        /// `{tier name: limit or None}`, the shape of a tenant's config.
        fn as_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
            let d = PyDict::new(py);
            for tier in Tier::ALL {
                d.set_item(tier.name(), opt(self.0.get(tier)))?;
            }
            Ok(d)
        }

        fn __repr__(&self) -> String {
            let l = &self.0;
            format!(
                "Limits(per_minute={}, per_hour={}, per_day={}, expensive_per_hour={}, tokens_per_minute={})",
                fmt_opt(l.per_minute),
                fmt_opt(l.per_hour),
                fmt_opt(l.per_day),
                fmt_opt(l.expensive_per_hour),
                fmt_opt(l.tokens_per_minute),
            )
        }
    }

    /// One tier's limit, remaining whole units and seconds until full.
    #[pyclass(frozen, get_all, name = "TierStatus", module = "tollway._core")]
    pub struct PyTierStatus {
        name: &'static str,
        limit: u64,
        remaining: u64,
        reset: f64,
    }

    impl From<TierStatus> for PyTierStatus {
        fn from(s: TierStatus) -> Self {
            PyTierStatus {
                name: s.tier.name(),
                limit: s.limit,
                remaining: s.remaining,
                reset: s.reset_s,
            }
        }
    }

    #[pymethods]
    impl PyTierStatus {
        fn __repr__(&self) -> String {
            format!(
                "TierStatus(name='{}', limit={}, remaining={}, reset={:?})",
                self.name, self.limit, self.remaining, self.reset
            )
        }
    }

    /// A check's answer. The tier details are built only when read, so a
    /// check that only looks at `allowed` allocates one small object.
    #[pyclass(frozen, name = "RateDecision", module = "tollway._core")]
    pub struct PyDecision(Decision);

    #[pymethods]
    impl PyDecision {
        #[getter]
        fn allowed(&self) -> bool {
            self.0.allowed
        }

        #[getter]
        fn retry_after(&self) -> f64 {
            self.0.retry_after
        }

        #[getter]
        fn denied_by<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
            let names: Vec<_> = caught(|| self.0.denied_by().map(Tier::name).collect())?;
            PyTuple::new(py, names)
        }

        #[getter]
        fn tiers<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
            let d = PyDict::new(py);
            for status in caught(|| self.0.tiers())? {
                d.set_item(status.tier.name(), PyTierStatus::from(status))?;
            }
            Ok(d)
        }

        #[getter]
        fn limits(&self) -> PyResult<PyLimits> {
            caught(|| PyLimits(self.0.limits()))
        }

        /// One tier by name; None when that tier is disabled.
        fn tier(&self, name: &str) -> PyResult<Option<PyTierStatus>> {
            let tier = Tier::from_name(name)
                .ok_or_else(|| PyKeyError::new_err(format!("no rate-limit tier {name:?}")))?;
            caught(|| self.0.tier(tier).map(PyTierStatus::from))
        }

        fn __bool__(&self) -> bool {
            self.0.allowed
        }

        fn __repr__(&self) -> String {
            let names: Vec<_> = self.0.denied_by().map(|t| format!("'{}'", t.name())).collect();
            // Python's tuple repr: a lone item keeps its trailing comma.
            let denied = match names.as_slice() {
                [one] => format!("({one},)"),
                _ => format!("({})", names.join(", ")),
            };
            let retry = if self.0.retry_after.is_infinite() {
                "inf".to_owned()
            } else {
                format!("{:?}", self.0.retry_after)
            };
            format!(
                "RateDecision(allowed={}, retry_after={retry}, denied_by={denied})",
                if self.0.allowed { "True" } else { "False" },
            )
        }
    }

    fn cost(requests: u64, expensive: bool, tokens: u64) -> Cost {
        Cost {
            requests,
            expensive,
            tokens,
        }
    }

    /// Multi-tier rate limiter keyed by tenant; thread-safe.
    #[pyclass(frozen, name = "RateLimiter", module = "tollway._core")]
    pub struct PyRateLimiter(RateLimiter);

    #[pymethods]
    impl PyRateLimiter {
        #[new]
        #[pyo3(signature = (limits = None, *, shards = 64))]
        fn new(limits: Option<PyRef<'_, PyLimits>>, shards: usize) -> PyResult<Self> {
            let limits = limits.map_or(Limits::DEFAULT, |l| l.0);
            caught(|| PyRateLimiter(RateLimiter::with_shards(limits, shards)))
        }

        #[pyo3(signature = (key, cost = 1, *, expensive = false, tokens = 0, now = None))]
        fn check(
            &self,
            key: &str,
            cost: u64,
            expensive: bool,
            tokens: u64,
            now: Option<f64>,
        ) -> PyResult<PyDecision> {
            let now = now_or_clock(now)?;
            caught(|| PyDecision(self.0.check(key, self::cost(cost, expensive, tokens), now)))
        }

        #[pyo3(signature = (key, cost = 1, *, expensive = false, tokens = 0, now = None))]
        fn status(
            &self,
            key: &str,
            cost: u64,
            expensive: bool,
            tokens: u64,
            now: Option<f64>,
        ) -> PyResult<PyDecision> {
            let now = now_or_clock(now)?;
            caught(|| PyDecision(self.0.status(key, self::cost(cost, expensive, tokens), now)))
        }

        #[pyo3(signature = (key, limits, *, now = None))]
        fn set_limits(
            &self,
            key: &str,
            limits: Option<PyRef<'_, PyLimits>>,
            now: Option<f64>,
        ) -> PyResult<()> {
            let now = now_or_clock(now)?;
            let limits = limits.map(|l| l.0);
            caught(|| self.0.set_limits(key, limits, now))
        }

        fn limits(&self, key: &str) -> PyResult<PyLimits> {
            caught(|| PyLimits(self.0.limits(key)))
        }

        #[getter]
        fn default_limits(&self) -> PyResult<PyLimits> {
            caught(|| PyLimits(self.0.default_limits()))
        }

        #[pyo3(signature = (limits, *, now = None))]
        fn set_default_limits(
            &self,
            py: Python<'_>,
            limits: PyRef<'_, PyLimits>,
            now: Option<f64>,
        ) -> PyResult<()> {
            let now = now_or_clock(now)?;
            let limits = limits.0;
            // Touches every key: let other Python threads run meanwhile.
            py.detach(|| caught(|| self.0.set_default_limits(limits, now)))
        }

        #[pyo3(signature = (now = None))]
        fn evict_idle(&self, py: Python<'_>, now: Option<f64>) -> PyResult<usize> {
            let now = now_or_clock(now)?;
            py.detach(|| caught(|| self.0.evict_idle(now)))
        }

        fn __len__(&self) -> PyResult<usize> {
            caught(|| self.0.len())
        }

        fn __repr__(&self) -> String {
            format!("RateLimiter(keys={})", self.0.len())
        }
    }

    type TransitionTuple = (&'static str, &'static str, f64, &'static str);

    fn transition(t: Transition) -> TransitionTuple {
        (t.from.as_str(), t.to.as_str(), t.at, t.reason.as_str())
    }

    /// What `CircuitBreaker.snapshot` returns.
    #[pyclass(frozen, get_all, name = "BreakerSnapshot", module = "tollway._core")]
    pub struct PyBreakerSnapshot {
        state: &'static str,
        failures: u32,
        calls: u32,
        opens: u64,
        consecutive_opens: u32,
        recovery_timeout: f64,
        retry_after: f64,
        probes_in_flight: u32,
        dropped_transitions: u64,
    }

    impl From<Snapshot> for PyBreakerSnapshot {
        fn from(s: Snapshot) -> Self {
            PyBreakerSnapshot {
                state: s.state.as_str(),
                failures: s.failures,
                calls: s.calls,
                opens: s.opens,
                consecutive_opens: s.consecutive_opens,
                recovery_timeout: s.recovery_timeout_s,
                retry_after: s.retry_after_s,
                probes_in_flight: s.probes_in_flight,
                dropped_transitions: s.dropped_transitions,
            }
        }
    }

    #[pymethods]
    impl PyBreakerSnapshot {
        fn __repr__(&self) -> String {
            format!(
                "BreakerSnapshot(state='{}', failures={}, calls={}, opens={}, consecutive_opens={}, recovery_timeout={:?}, retry_after={:?}, probes_in_flight={})",
                self.state,
                self.failures,
                self.calls,
                self.opens,
                self.consecutive_opens,
                self.recovery_timeout,
                self.retry_after,
                self.probes_in_flight
            )
        }
    }

    /// Circuit breaker for one provider or deployment; thread-safe.
    #[pyclass(frozen, name = "CircuitBreaker", module = "tollway._core")]
    pub struct PyCircuitBreaker(CircuitBreaker);

    #[pymethods]
    impl PyCircuitBreaker {
        #[new]
        // Literal defaults (BreakerConfig::DEFAULT's values) so help() and
        // stubtest see them; tests/test_breaker.py checks they agree.
        #[pyo3(signature = (
            *,
            failure_threshold = 5,
            window_s = 60.0,
            failure_rate = None,
            min_calls = 20,
            recovery_s = 30.0,
            recovery_multiplier = 2.0,
            max_recovery_s = 300.0,
            half_open_max_calls = 1,
            success_threshold = 1,
            slow_call_s = None,
            probe_timeout_s = 60.0,
            healthy_reset_s = 60.0,
        ))]
        #[allow(clippy::too_many_arguments)]
        fn new(
            failure_threshold: u32,
            window_s: f64,
            failure_rate: Option<f64>,
            min_calls: u32,
            recovery_s: f64,
            recovery_multiplier: f64,
            max_recovery_s: f64,
            half_open_max_calls: u32,
            success_threshold: u32,
            slow_call_s: Option<f64>,
            probe_timeout_s: f64,
            healthy_reset_s: f64,
        ) -> PyResult<Self> {
            let config = BreakerConfig {
                failure_threshold,
                window_s,
                failure_rate,
                min_calls,
                recovery_s,
                recovery_multiplier,
                max_recovery_s,
                half_open_max_calls,
                success_threshold,
                slow_call_s,
                probe_timeout_s,
                healthy_reset_s,
            };
            caught(|| CircuitBreaker::new(config))?
                .map(PyCircuitBreaker)
                .map_err(|e| PyValueError::new_err(e.to_string()))
        }

        #[pyo3(signature = (now = None))]
        fn allow(&self, now: Option<f64>) -> PyResult<bool> {
            let now = now_or_clock(now)?;
            caught(|| self.0.allow(now))
        }

        #[pyo3(signature = (now = None, duration_s = 0.0))]
        fn record_success(
            &self,
            now: Option<f64>,
            duration_s: f64,
        ) -> PyResult<Option<TransitionTuple>> {
            let now = now_or_clock(now)?;
            caught(|| self.0.record_success(now, duration_s).map(transition))
        }

        #[pyo3(signature = (now = None))]
        fn record_failure(&self, now: Option<f64>) -> PyResult<Option<TransitionTuple>> {
            let now = now_or_clock(now)?;
            caught(|| self.0.record_failure(now).map(transition))
        }

        #[pyo3(signature = (now = None))]
        fn state(&self, now: Option<f64>) -> PyResult<&'static str> {
            let now = now_or_clock(now)?;
            caught(|| self.0.state(now).as_str())
        }

        #[pyo3(signature = (now = None))]
        fn retry_after(&self, now: Option<f64>) -> PyResult<f64> {
            let now = now_or_clock(now)?;
            caught(|| self.0.retry_after(now))
        }

        #[pyo3(signature = (now = None))]
        fn snapshot(&self, now: Option<f64>) -> PyResult<PyBreakerSnapshot> {
            let now = now_or_clock(now)?;
            caught(|| self.0.snapshot(now).into())
        }

        #[pyo3(signature = (now = None))]
        fn reset(&self, now: Option<f64>) -> PyResult<Option<TransitionTuple>> {
            let now = now_or_clock(now)?;
            caught(|| self.0.reset(now).map(transition))
        }

        #[pyo3(signature = (open_for_s, now = None))]
        fn force_open(&self, open_for_s: f64, now: Option<f64>) -> PyResult<Option<TransitionTuple>> {
            let now = now_or_clock(now)?;
            caught(|| self.0.force_open(now, open_for_s).map(transition))
        }

        #[pyo3(signature = (now = None))]
        fn force_close(&self, now: Option<f64>) -> PyResult<Option<TransitionTuple>> {
            let now = now_or_clock(now)?;
            caught(|| self.0.force_close(now).map(transition))
        }

        fn drain_transitions(&self) -> PyResult<Vec<TransitionTuple>> {
            caught(|| self.0.drain_transitions().into_iter().map(transition).collect())
        }

        #[getter]
        fn pending_transitions(&self) -> PyResult<usize> {
            caught(|| self.0.pending_transitions())
        }

        /// The configuration, as keyword arguments of the constructor.
        fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
            let c = caught(|| self.0.config())?;
            let d = PyDict::new(py);
            d.set_item("failure_threshold", c.failure_threshold)?;
            d.set_item("window_s", c.window_s)?;
            d.set_item("failure_rate", c.failure_rate)?;
            d.set_item("min_calls", c.min_calls)?;
            d.set_item("recovery_s", c.recovery_s)?;
            d.set_item("recovery_multiplier", c.recovery_multiplier)?;
            d.set_item("max_recovery_s", c.max_recovery_s)?;
            d.set_item("half_open_max_calls", c.half_open_max_calls)?;
            d.set_item("success_threshold", c.success_threshold)?;
            d.set_item("slow_call_s", c.slow_call_s)?;
            d.set_item("probe_timeout_s", c.probe_timeout_s)?;
            d.set_item("healthy_reset_s", c.healthy_reset_s)?;
            Ok(d)
        }
    }

    pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
        init_clock(m.py())?;
        m.add_class::<PyLimits>()?;
        m.add_class::<PyTierStatus>()?;
        m.add_class::<PyDecision>()?;
        m.add_class::<PyRateLimiter>()?;
        m.add_class::<PyBreakerSnapshot>()?;
        m.add_class::<PyCircuitBreaker>()?;
        Ok(())
    }
}

/// The JetStream delivery scanner (`natsframe`) for the raw NATS readers.
mod nats_frames {
    use pyo3::exceptions::PyValueError;
    use pyo3::prelude::*;
    use pyo3::types::{PyBytes, PyList};

    use crate::natsframe::scan_deliveries;

    use super::caught;

    /// (stream sequences, payloads, position after them, last consumer sequence,
    /// pending after the last one or -1): see `natsframe::scan_deliveries`.
    #[pyfunction]
    #[allow(clippy::type_complexity)]
    fn scan_js_deliveries<'py>(
        py: Python<'py>,
        buf: &Bound<'py, PyBytes>,
        pos: usize,
        end: usize,
        sid: &[u8],
        delivered: u64,
    ) -> PyResult<(Bound<'py, PyList>, Bound<'py, PyList>, usize, u64, i64)> {
        let data = buf.as_bytes();
        let mut found = Vec::new();
        let scan = caught(|| {
            scan_deliveries(data, pos.min(data.len()), end, sid, delivered, &mut found)
        })?
        .map_err(|g| {
                PyValueError::new_err(format!(
                    "deliveries missing: consumer sequence {} where {} was next",
                    g.got, g.expected
                ))
            })?;
        let seqs = PyList::new(py, found.iter().map(|&(s, _, _)| s))?;
        let payloads = PyList::new(py, found.iter().map(|&(_, a, b)| PyBytes::new(py, &data[a..b])))?;
        let pending = scan.pending.map_or(-1, |p| i64::try_from(p).unwrap_or(i64::MAX));
        Ok((seqs, payloads, scan.pos, scan.delivered, pending))
    }

    pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add_function(wrap_pyfunction!(scan_js_deliveries, m)?)?;
        Ok(())
    }
}

/// The request body check (`jsonscan`).
mod json_scan {
    use pyo3::prelude::*;
    use pyo3::types::PyBytes;

    use super::caught;

    /// The first name the top-level object of `body` holds twice, else None (also when
    /// `body` is not a JSON object): see `jsonscan::duplicate_member`.
    #[pyfunction]
    fn duplicate_member(py: Python<'_>, body: &[u8]) -> PyResult<Option<String>> {
        let check = || caught(|| crate::jsonscan::duplicate_member(body).flatten());
        if body.len() >= 1 << 20 {
            py.detach(check) // a large body: other threads may run meanwhile
        } else {
            check()
        }
    }

    /// Where `body` stops being UTF-8 (the offset of the first bad byte), else None; the
    /// check `bytes.decode` makes, without building the string.
    #[pyfunction]
    fn utf8_error(py: Python<'_>, body: &[u8]) -> Option<usize> {
        let check = || std::str::from_utf8(body).err().map(|e| e.valid_up_to());
        if body.len() >= 1 << 20 {
            py.detach(check) // about a millisecond: other threads may run meanwhile
        } else {
            check()
        }
    }

    /// A run of chat chunks that are text deltas alone, as another API's events: see
    /// `deltas::text_deltas`. (events, text, first finish reason, last one, events
    /// written), or None: the run is the Python translator's to read.
    #[pyfunction]
    #[pyo3(signature = (run, head, middle, tail, seq))]
    #[allow(clippy::type_complexity)]
    fn text_deltas<'py>(
        py: Python<'py>,
        run: &[u8],
        head: &[u8],
        middle: &[u8],
        tail: &[u8],
        seq: i64,
    ) -> PyResult<Option<(Bound<'py, PyBytes>, String, Option<String>, Option<String>, u64)>> {
        let template = crate::deltas::Template {
            head,
            middle,
            tail,
            seq: u64::try_from(seq).ok(),
        };
        let got = caught(|| crate::deltas::text_deltas(run, &template))?;
        Ok(got.map(|d| {
            (PyBytes::new(py, &d.out), d.text, d.first_finish, d.last_finish, d.count)
        }))
    }

    /// Where a stream's complete events stop being plain: see `sse::plain_end`.
    #[pyfunction]
    fn plain_end(block: &[u8]) -> PyResult<usize> {
        caught(|| crate::sse::plain_end(block))
    }

    pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add_function(wrap_pyfunction!(plain_end, m)?)?;
        m.add_function(wrap_pyfunction!(text_deltas, m)?)?;
        m.add_function(wrap_pyfunction!(duplicate_member, m)?)?;
        m.add_function(wrap_pyfunction!(utf8_error, m)?)?;
        Ok(())
    }
}

/// The native stream relay (`relay.rs`): one per event loop, its thread stopped when it
/// is closed or collected.
mod native_relay {
    use std::sync::Mutex;

    use pyo3::exceptions::{PyRuntimeError, PyValueError};
    use pyo3::prelude::*;
    use pyo3::types::PyBytes;

    use crate::relay::Relay;

    use super::caught;

    #[pyclass(frozen, name = "Relay", module = "tollway._core")]
    struct PyRelay {
        relay: Mutex<Option<Relay>>,
        notify_fd: i32,
    }

    type Outcome<'py> = (u64, u8, bool, bool, Option<Bound<'py, PyBytes>>, Bound<'py, PyBytes>,
                         &'static str);

    fn outcomes(py: Python<'_>, done: Vec<crate::relay::Finished>) -> Vec<Outcome<'_>> {
        done.into_iter()
            .map(|f| (f.id, f.end as u8, f.done, f.error, f.usage.map(|u| PyBytes::new(py, &u)),
                      PyBytes::new(py, &f.collected), f.message))
            .collect()
    }

    #[pymethods]
    impl PyRelay {
        #[new]
        fn new() -> PyResult<Self> {
            let relay = Relay::new().map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
            let notify_fd = relay.notify_fd();
            Ok(PyRelay { relay: Mutex::new(Some(relay)), notify_fd })
        }

        /// The eventfd that turns readable when streams have ended (see finished()).
        #[getter]
        fn notify_fd(&self) -> i32 {
            self.notify_fd
        }

        /// Take over a stream (the fds are duplicated: the caller keeps its own); its id.
        #[allow(clippy::too_many_arguments)]
        #[pyo3(signature = (up_fd, client_fd, reply, untaken, pending, keep_usage, silence_s,
                            total_s))]
        fn start(&self, py: Python<'_>, up_fd: i32, client_fd: i32, reply: &[u8],
                 untaken: usize, pending: &[u8], keep_usage: bool, silence_s: f64,
                 total_s: f64) -> PyResult<u64> {
            let guard = self.relay.lock().unwrap_or_else(|e| e.into_inner());
            let relay = guard.as_ref().ok_or_else(|| PyRuntimeError::new_err("relay closed"))?;
            let result = py.detach(|| caught(|| relay.start(up_fd, client_fd, reply, untaken,
                                                            pending, keep_usage, silence_s,
                                                            total_s)))?;
            result.map_err(PyValueError::new_err)
        }

        /// Stop relaying a stream; whether it was running. The relay is done with its
        /// sockets when this returns.
        fn cancel(&self, id: u64) -> PyResult<bool> {
            let guard = self.relay.lock().unwrap_or_else(|e| e.into_inner());
            Ok(match guard.as_ref() {
                Some(relay) => caught(|| relay.cancel(id))?,
                None => false,
            })
        }

        /// The streams that ended since the last call: (id, end, done, error, usage
        /// payload or None, the forwarded events, message).
        fn finished<'py>(&self, py: Python<'py>) -> PyResult<Vec<Outcome<'py>>> {
            let guard = self.relay.lock().unwrap_or_else(|e| e.into_inner());
            let Some(relay) = guard.as_ref() else { return Ok(Vec::new()) };
            let done = caught(|| relay.finished())?;
            Ok(outcomes(py, done))
        }

        /// How many streams it relays now.
        fn running(&self) -> usize {
            let guard = self.relay.lock().unwrap_or_else(|e| e.into_inner());
            guard.as_ref().map_or(0, Relay::running)
        }

        /// Stop the thread and end every stream it still relays (their sockets'
        /// duplicates closed, as if the client left); the outcomes not taken yet.
        fn close<'py>(&self, py: Python<'py>) -> Vec<Outcome<'py>> {
            let relay = self.relay.lock().unwrap_or_else(|e| e.into_inner()).take();
            let done = py.detach(|| relay.map(|mut r| r.shutdown()).unwrap_or_default());
            outcomes(py, done)
        }
    }

    pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add_class::<PyRelay>()?;
        Ok(())
    }
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    tokens_cost::register(m)?;
    limiter_breaker::register(m)?;
    nats_frames::register(m)?;
    json_scan::register(m)?;
    native_relay::register(m)?;
    m.add("CoreError", m.py().get_type::<CoreError>())?;
    m.add_function(wrap_pyfunction!(test_panic, m)?)?;
    Ok(())
}

//! Token-exact cost: prices per model and the estimates the guards check.
//!
//! Money is integer. A price is held in pico-USD per token, which is the
//! same number as micro-USD per million tokens, so any list price with up
//! to 6 decimals of USD per Mtok is exact (prices with more decimals round
//! up). A cost is in nano-USD (the events' unit), rounded up once per call:
//! an estimate or a charge is never below the true amount.

use std::collections::HashMap;
use std::fmt;
use std::sync::{PoisonError, RwLock};

use crate::tokenizer::chat::ChatPrompt;
use crate::tokenizer::encoding_for_model;

/// Per-token prices of one model, in pico-USD per token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Price {
    pub input_picousd_per_token: u64,
    pub output_picousd_per_token: u64,
}

impl Price {
    /// From decimal USD-per-million-token strings as price lists print them
    /// ("0.15", "2.5", "1e-7").
    pub fn from_usd_per_mtok(input: &str, output: &str) -> Result<Price, PriceError> {
        Ok(Price {
            input_picousd_per_token: parse_usd_per_mtok(input)?,
            output_picousd_per_token: parse_usd_per_mtok(output)?,
        })
    }

    /// Cost of a call in nano-USD, rounded up; saturates at u64::MAX.
    pub fn cost_nanousd(&self, prompt_tokens: u64, completion_tokens: u64) -> u64 {
        let picousd = u128::from(prompt_tokens) * u128::from(self.input_picousd_per_token)
            + u128::from(completion_tokens) * u128::from(self.output_picousd_per_token);
        u64::try_from(picousd.div_ceil(1000)).unwrap_or(u64::MAX)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PriceError(String);

impl fmt::Display for PriceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PriceError {}

/// A non-negative decimal number of USD per million tokens, as pico-USD per
/// token (the same number scaled by 10^6), exactly, rounding up past 6
/// decimals. Accepts an optional exponent (`1.5e-3`).
pub fn parse_usd_per_mtok(text: &str) -> Result<u64, PriceError> {
    let bad = || {
        PriceError(format!("invalid price {text:?}: expected a non-negative decimal number of USD per million tokens"))
    };
    let s = text.trim();
    let s = s.strip_prefix('+').unwrap_or(s);
    let (number, exponent) = match s.find(['e', 'E']) {
        Some(at) => (&s[..at], s[at + 1..].parse::<i32>().map_err(|_| bad())?),
        None => (s, 0),
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if (whole.is_empty() && fraction.is_empty())
        || !whole
            .bytes()
            .chain(fraction.bytes())
            .all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    let digits = format!("{whole}{fraction}");
    let digits = digits.trim_start_matches('0');
    // value = digits * 10^scale, in micro-USD per Mtok.
    let scale = i64::from(exponent) + 6 - fraction.len() as i64;
    let too_large = || PriceError(format!("price {text:?} is too large"));
    if digits.is_empty() {
        return Ok(0);
    }
    if scale >= 0 {
        let mut value: u64 = digits.parse().map_err(|_| too_large())?;
        for _ in 0..scale {
            value = value.checked_mul(10).ok_or_else(too_large)?;
        }
        return Ok(value);
    }
    let cut = -scale as usize;
    if cut >= digits.len() {
        // Below one pico-USD per token but not zero.
        return Ok(1);
    }
    let (kept, dropped) = digits.split_at(digits.len() - cut);
    let value: u64 = kept.parse().map_err(|_| too_large())?;
    let round_up = u64::from(dropped.bytes().any(|b| b != b'0'));
    value.checked_add(round_up).ok_or_else(too_large)
}

/// What a call may cost at most, before it is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Estimate {
    pub prompt_tokens: u64,
    pub max_output_tokens: u64,
    pub max_cost_nanousd: u64,
}

/// The model has no price: the caller decides (refuse, or route elsewhere).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownModel(pub String);

impl fmt::Display for UnknownModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no price for model {:?}", self.0)
    }
}

impl std::error::Error for UnknownModel {}

/// Prices by model id, replaceable at run time from any thread.
///
/// A model's price is looked up by its id, then without a date suffix
/// (`gpt-4o-2024-08-06`, `gpt-3.5-turbo-0125`), then without an OpenRouter
/// vendor prefix (`openai/gpt-4o` -> `gpt-4o`), then without both; the
/// first id in the table wins, so a listed OpenRouter price beats the
/// vendor's own.
pub struct CostEstimator {
    prices: RwLock<HashMap<String, Price>>,
    default_max_output_tokens: u64,
}

impl CostEstimator {
    /// `default_max_output_tokens` bounds the output of a request that sets
    /// neither `max_completion_tokens` nor `max_tokens`.
    pub fn new(
        prices: impl IntoIterator<Item = (String, Price)>,
        default_max_output_tokens: u64,
    ) -> Self {
        CostEstimator {
            prices: RwLock::new(prices.into_iter().collect()),
            default_max_output_tokens,
        }
    }

    pub fn default_max_output_tokens(&self) -> u64 {
        self.default_max_output_tokens
    }

    /// Adds a model's price or replaces it.
    pub fn set_price(&self, model: &str, price: Price) {
        let mut prices = self.prices.write().unwrap_or_else(PoisonError::into_inner);
        prices.insert(model.to_owned(), price);
    }

    pub fn prices(&self) -> Vec<(String, Price)> {
        let prices = self.prices.read().unwrap_or_else(PoisonError::into_inner);
        let mut all: Vec<_> = prices.iter().map(|(m, p)| (m.clone(), *p)).collect();
        all.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        all
    }

    pub fn price(&self, model: &str) -> Option<Price> {
        let prices = self.prices.read().unwrap_or_else(PoisonError::into_inner);
        let undated = strip_date_suffix(model);
        let unprefixed = model.split_once('/').map(|(_, rest)| rest);
        [
            Some(model),
            undated,
            unprefixed,
            unprefixed.and_then(strip_date_suffix),
        ]
        .into_iter()
        .flatten()
        .find_map(|id| prices.get(id).copied())
    }

    fn require_price(&self, model: &str) -> Result<Price, UnknownModel> {
        self.price(model)
            .ok_or_else(|| UnknownModel(model.to_owned()))
    }

    /// The output bound of a request: `max_completion_tokens`, else
    /// `max_tokens`, else the default; times `n` choices.
    pub fn max_output_tokens(
        &self,
        max_completion_tokens: Option<u64>,
        max_tokens: Option<u64>,
        choices: Option<u64>,
    ) -> u64 {
        let per_choice = max_completion_tokens
            .or(max_tokens)
            .unwrap_or(self.default_max_output_tokens);
        per_choice.saturating_mul(choices.unwrap_or(1).max(1))
    }

    /// The bound for a prompt of known size.
    pub fn estimate(
        &self,
        model: &str,
        prompt_tokens: u64,
        max_output_tokens: u64,
    ) -> Result<Estimate, UnknownModel> {
        let price = self.require_price(model)?;
        Ok(Estimate {
            prompt_tokens,
            max_output_tokens,
            max_cost_nanousd: price.cost_nanousd(prompt_tokens, max_output_tokens),
        })
    }

    /// Counts the prompt with the model's encoding, then bounds the cost.
    pub fn estimate_chat(
        &self,
        model: &str,
        prompt: &ChatPrompt<'_>,
        max_output_tokens: u64,
    ) -> Result<Estimate, UnknownModel> {
        self.require_price(model)?;
        let prompt_tokens = prompt.count(encoding_for_model(model));
        self.estimate(model, prompt_tokens, max_output_tokens)
    }

    /// Embeddings: the inputs' tokens, no output.
    pub fn estimate_embeddings(
        &self,
        model: &str,
        inputs: &[&str],
    ) -> Result<Estimate, UnknownModel> {
        self.require_price(model)?;
        let encoding = encoding_for_model(model);
        let tokens: usize = inputs.iter().map(|text| encoding.count(text)).sum();
        self.estimate(model, tokens as u64, 0)
    }

    /// The actual cost of a finished call, from its usage record.
    pub fn cost(
        &self,
        model: &str,
        prompt_tokens: u64,
        completion_tokens: u64,
    ) -> Result<u64, UnknownModel> {
        Ok(self
            .require_price(model)?
            .cost_nanousd(prompt_tokens, completion_tokens))
    }
}

/// `gpt-4o-2024-08-06` -> `gpt-4o`, `gpt-3.5-turbo-0125` -> `gpt-3.5-turbo`.
fn strip_date_suffix(model: &str) -> Option<&str> {
    let is_digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
    let (rest, last) = model.rsplit_once('-')?;
    if is_digits(last, 4) {
        return Some(rest);
    }
    let (rest, month) = rest.rsplit_once('-')?;
    let (rest, year) = rest.rsplit_once('-')?;
    (is_digits(last, 2) && is_digits(month, 2) && is_digits(year, 4)).then_some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn price(input: &str, output: &str) -> Price {
        Price::from_usd_per_mtok(input, output).unwrap()
    }

    #[test]
    fn prices_parse_exactly() {
        assert_eq!(parse_usd_per_mtok("0.15"), Ok(150_000));
        assert_eq!(parse_usd_per_mtok("2.5"), Ok(2_500_000));
        assert_eq!(parse_usd_per_mtok("10"), Ok(10_000_000));
        assert_eq!(parse_usd_per_mtok("0.000001"), Ok(1));
        assert_eq!(parse_usd_per_mtok("1e-06"), Ok(1));
        assert_eq!(parse_usd_per_mtok("1.5E2"), Ok(150_000_000));
        assert_eq!(parse_usd_per_mtok("0"), Ok(0));
        assert_eq!(parse_usd_per_mtok("0.0"), Ok(0));
        assert_eq!(parse_usd_per_mtok(".5"), Ok(500_000));
        assert_eq!(parse_usd_per_mtok("007.25"), Ok(7_250_000));
    }

    #[test]
    fn prices_past_six_decimals_round_up() {
        assert_eq!(parse_usd_per_mtok("0.0000001"), Ok(1));
        assert_eq!(parse_usd_per_mtok("0.1234561"), Ok(123_457));
        assert_eq!(parse_usd_per_mtok("0.1234560"), Ok(123_456));
        assert_eq!(parse_usd_per_mtok("1e-300"), Ok(1));
    }

    #[test]
    fn bad_prices_are_rejected() {
        for bad in [
            "",
            "-1",
            "abc",
            "1.2.3",
            "nan",
            "inf",
            "1e",
            ".",
            "1e99999999999",
        ] {
            assert!(parse_usd_per_mtok(bad).is_err(), "{bad:?}");
        }
        assert!(parse_usd_per_mtok("1e30").is_err());
    }

    #[test]
    fn cost_rounds_up_to_the_next_nanousd() {
        // 0.15 USD/Mtok = 150,000 pico-USD per token = 150 nano-USD.
        let p = price("0.15", "0.6");
        assert_eq!(p.cost_nanousd(1, 0), 150);
        assert_eq!(p.cost_nanousd(1000, 100), 150_000 + 60_000);
        // 0.000001 USD/Mtok = 1 pico-USD per token: 1 token -> 1 nano-USD.
        let tiny = price("0.000001", "0");
        assert_eq!(tiny.cost_nanousd(1, 0), 1);
        assert_eq!(tiny.cost_nanousd(1000, 0), 1);
        assert_eq!(tiny.cost_nanousd(1001, 0), 2);
        assert_eq!(price("0", "0").cost_nanousd(1_000_000, 1_000_000), 0);
        // One Mtok at 2.5 USD/Mtok is 2.5 USD = 2.5e9 nano-USD.
        assert_eq!(price("2.5", "10").cost_nanousd(1_000_000, 0), 2_500_000_000);
        assert_eq!(
            price("1000", "1000").cost_nanousd(u64::MAX, u64::MAX),
            u64::MAX
        );
    }

    fn estimator() -> CostEstimator {
        CostEstimator::new(
            [
                ("gpt-4o-mini".to_owned(), price("0.15", "0.6")),
                ("gpt-3.5-turbo".to_owned(), price("0.5", "1.5")),
                ("openai/gpt-4o".to_owned(), price("2.5", "10")),
                ("gpt-4o".to_owned(), price("5", "15")),
            ],
            1024,
        )
    }

    #[test]
    fn lookup_falls_back_through_date_and_vendor() {
        let e = estimator();
        let mini = Some(price("0.15", "0.6"));
        assert_eq!(e.price("gpt-4o-mini"), mini);
        assert_eq!(e.price("gpt-4o-mini-2024-07-18"), mini);
        assert_eq!(e.price("openai/gpt-4o-mini"), mini);
        assert_eq!(e.price("openai/gpt-4o-mini-2024-07-18"), mini);
        assert_eq!(e.price("gpt-3.5-turbo-0125"), Some(price("0.5", "1.5")));
        // A listed OpenRouter id keeps its own price.
        assert_eq!(e.price("openai/gpt-4o"), Some(price("2.5", "10")));
        assert_eq!(e.price("gpt-4o"), Some(price("5", "15")));
        assert_eq!(e.price("gpt-4o-mini-2024"), mini);
        assert_eq!(e.price("mystery-model"), None);
        assert_eq!(e.price("gpt-4o-mini-2024-7-18"), None);
    }

    #[test]
    fn unknown_models_are_an_error_the_caller_sees() {
        let e = estimator();
        assert_eq!(e.cost("mystery", 1, 1), Err(UnknownModel("mystery".into())));
        assert!(e.estimate_embeddings("mystery", &["x"]).is_err());
        e.set_price("mystery", price("1", "2"));
        assert_eq!(e.cost("mystery", 1_000, 1_000), Ok(1_000_000 + 2_000_000));
    }

    #[test]
    fn set_price_replaces() {
        let e = estimator();
        e.set_price("gpt-4o-mini", price("1", "1"));
        assert_eq!(e.price("gpt-4o-mini"), Some(price("1", "1")));
        assert_eq!(e.prices().len(), 4);
    }

    #[test]
    fn output_bound() {
        let e = estimator();
        assert_eq!(e.max_output_tokens(None, None, None), 1024);
        assert_eq!(e.max_output_tokens(None, Some(50), None), 50);
        assert_eq!(e.max_output_tokens(Some(70), Some(50), None), 70);
        assert_eq!(e.max_output_tokens(Some(70), None, Some(3)), 210);
        assert_eq!(e.max_output_tokens(Some(70), None, Some(0)), 70);
    }

    #[test]
    fn chat_estimate_counts_with_the_models_encoding() {
        let e = estimator();
        let mut prompt = ChatPrompt::new();
        prompt.message();
        prompt.string_field("role", "user");
        prompt.string_field("content", "hello world");
        // 3 + "user" (1) + "hello world" (2) + 3.
        let est = e.estimate_chat("gpt-4o-mini", &prompt, 100).unwrap();
        assert_eq!(
            est,
            Estimate {
                prompt_tokens: 9,
                max_output_tokens: 100,
                max_cost_nanousd: 9 * 150 + 100 * 600
            }
        );
        let emb = e
            .estimate_embeddings("gpt-3.5-turbo", &["hello world", "hi"])
            .unwrap();
        assert_eq!(emb.prompt_tokens, 3);
        assert_eq!(emb.max_cost_nanousd, 1500);
    }

    #[test]
    fn estimator_is_shared_across_threads() {
        let e = std::sync::Arc::new(estimator());
        let handles: Vec<_> = (0..4)
            .map(|k| {
                let e = e.clone();
                std::thread::spawn(move || {
                    for i in 0..200u64 {
                        e.set_price(
                            &format!("m{k}-{i}"),
                            Price {
                                input_picousd_per_token: i,
                                output_picousd_per_token: i,
                            },
                        );
                        assert_eq!(e.cost(&format!("m{k}-{i}"), 1000, 0), Ok(i));
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(e.prices().len(), 4 + 800);
    }
}

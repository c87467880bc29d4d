//! Model prices, for `cost_usd` when a span carries no cost of its own.
//!
//! A model name is matched by the longest configured prefix after lowercasing and dropping a
//! `provider/` prefix, so `gpt-4o-mini-2024-07-18` and `openai/gpt-4o-mini` both price as
//! `gpt-4o-mini`. Prices are USD per million tokens.

use serde::Deserialize;

/// The price of one model family.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    /// Model name prefix this price applies to.
    #[serde(rename = "match")]
    pub prefix: String,
    /// USD per million input (prompt) tokens.
    pub input_per_million: f64,
    /// USD per million output (completion) tokens.
    pub output_per_million: f64,
}

/// Prices by model-name prefix.
#[derive(Debug, Clone)]
pub struct PriceTable {
    /// Sorted by descending prefix length, so the first match is the longest.
    prices: Vec<ModelPrice>,
}

/// Built-in list prices (USD per million tokens) of common models.
const DEFAULTS: &[(&str, f64, f64)] = &[
    ("gpt-5", 1.25, 10.0),
    ("gpt-5-mini", 0.25, 2.0),
    ("gpt-5-nano", 0.05, 0.40),
    ("gpt-4.1", 2.0, 8.0),
    ("gpt-4.1-mini", 0.40, 1.60),
    ("gpt-4.1-nano", 0.10, 0.40),
    ("gpt-4o", 2.50, 10.0),
    ("gpt-4o-mini", 0.15, 0.60),
    ("gpt-4-turbo", 10.0, 30.0),
    ("gpt-4", 30.0, 60.0),
    ("gpt-3.5-turbo", 0.50, 1.50),
    ("o1", 15.0, 60.0),
    ("o1-mini", 1.10, 4.40),
    ("o3", 2.0, 8.0),
    ("o3-mini", 1.10, 4.40),
    ("o4-mini", 1.10, 4.40),
    ("text-embedding-3-small", 0.02, 0.0),
    ("text-embedding-3-large", 0.13, 0.0),
    ("claude-opus-4", 15.0, 75.0),
    ("claude-sonnet-4", 3.0, 15.0),
    ("claude-3-7-sonnet", 3.0, 15.0),
    ("claude-3-5-sonnet", 3.0, 15.0),
    ("claude-3-5-haiku", 0.80, 4.0),
    ("claude-3-opus", 15.0, 75.0),
    ("claude-3-haiku", 0.25, 1.25),
    ("gemini-2.5-pro", 1.25, 10.0),
    ("gemini-2.5-flash", 0.30, 2.50),
    ("gemini-2.0-flash", 0.10, 0.40),
    ("gemini-1.5-pro", 1.25, 5.0),
    ("gemini-1.5-flash", 0.075, 0.30),
    ("mistral-large", 2.0, 6.0),
    ("mistral-small", 0.20, 0.60),
];

impl Default for PriceTable {
    fn default() -> Self {
        Self::new(DEFAULTS.iter().map(|(p, i, o)| ModelPrice {
            prefix: (*p).to_string(),
            input_per_million: *i,
            output_per_million: *o,
        }))
    }
}

impl PriceTable {
    /// A table of the given prices.
    pub fn new(prices: impl IntoIterator<Item = ModelPrice>) -> Self {
        let mut prices: Vec<ModelPrice> = prices
            .into_iter()
            .map(|p| ModelPrice { prefix: p.prefix.to_ascii_lowercase(), ..p })
            .collect();
        prices.sort_by(|a, b| b.prefix.len().cmp(&a.prefix.len()).then(a.prefix.cmp(&b.prefix)));
        Self { prices }
    }

    /// The built-in defaults overridden (by equal prefix) and extended by `overrides`.
    pub fn with_overrides(overrides: impl IntoIterator<Item = ModelPrice>) -> Self {
        let mut all: Vec<ModelPrice> = overrides.into_iter().collect();
        for d in Self::default().prices {
            if !all.iter().any(|o| o.prefix.eq_ignore_ascii_case(&d.prefix)) {
                all.push(d);
            }
        }
        Self::new(all)
    }

    /// The price entry for a model, if any.
    pub fn lookup(&self, model: &str) -> Option<&ModelPrice> {
        let lower = model.to_ascii_lowercase();
        let name = lower.rsplit('/').next().unwrap_or(&lower);
        self.prices.iter().find(|p| name.starts_with(p.prefix.as_str()))
    }

    /// Cost in USD of a call, or `None` when the model is unknown or no tokens are known.
    pub fn cost(
        &self,
        model: &str,
        input_tokens: Option<i64>,
        output_tokens: Option<i64>,
    ) -> Option<f64> {
        if input_tokens.is_none() && output_tokens.is_none() {
            return None;
        }
        let p = self.lookup(model)?;
        let i = input_tokens.unwrap_or(0).max(0) as f64;
        let o = output_tokens.unwrap_or(0).max(0) as f64;
        Some((i * p.input_per_million + o * p.output_per_million) / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_wins() {
        let t = PriceTable::default();
        assert_eq!(t.lookup("gpt-4o-mini-2024-07-18").unwrap().prefix, "gpt-4o-mini");
        assert_eq!(t.lookup("openai/GPT-4o").unwrap().prefix, "gpt-4o");
        assert_eq!(t.lookup("gpt-4.1-nano").unwrap().prefix, "gpt-4.1-nano");
        assert!(t.lookup("my-own-model").is_none());
        let c = t.cost("gpt-4o-mini", Some(1_000_000), Some(1_000_000)).unwrap();
        assert!((c - 0.75).abs() < 1e-12);
        assert_eq!(t.cost("gpt-4o-mini", None, None), None);
    }

    #[test]
    fn overrides_replace_defaults() {
        let t = PriceTable::with_overrides([ModelPrice {
            prefix: "GPT-4o-mini".into(),
            input_per_million: 1.0,
            output_per_million: 2.0,
        }]);
        assert_eq!(t.lookup("gpt-4o-mini").unwrap().input_per_million, 1.0);
        assert_eq!(t.lookup("gpt-4o").unwrap().input_per_million, 2.5);
    }
}

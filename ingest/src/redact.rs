//! Redaction at ingest: values are masked in the decoded request, before normalisation, so
//! nothing unredacted reaches the write-ahead log, memory or Parquet.
//!
//! * Pattern rules (regular expressions) replace every match in every string value — span,
//!   event, link, resource and scope attributes (nested arrays and maps included), span names,
//!   status messages and event names — with `[REDACTED:<rule>]`. Built-in rules: `email`,
//!   `credit_card` (13–19 digits with optional spaces or dashes that pass the Luhn check),
//!   `api_key` (OpenAI `sk-…`, Anthropic `sk-ant-…`, AWS `AKIA…`, GitHub `ghp_…`/`github_pat_…`,
//!   Slack `xox?-…`, Google `AIza…`, and `Bearer` tokens).
//! * Key rules (glob patterns with `*`, e.g. `*.password`, `http.request.header.authorization`)
//!   replace the whole value of matching attribute keys with `[REDACTED]`.
//! * Dropping content: for the projects listed (or all), prompt and completion text is removed
//!   entirely — message attributes of every convention (`gen_ai.input.messages`,
//!   `gen_ai.prompt.*`, `llm.input_messages.*`, `input.value`, `traceloop.entity.input`, tool call
//!   arguments and results, …) and `gen_ai.*` events — so `input` and `output` stay empty.
//!
//! Every masked value and dropped attribute is counted (`spanlake_redactions_total{rule=…}`,
//! `spanlake_content_dropped_total`).

use std::collections::HashSet;

use regex::{Regex, RegexSet};
use spanlake_engine::metrics::{Counter, Exposition};
use spanlake_proto::collector::ExportTraceServiceRequest;
use spanlake_proto::common::{AnyValue, KeyValue, any_value};

/// The built-in pattern rules by name.
pub const BUILTIN: [(&str, &str); 3] = [
    ("email", r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"),
    ("credit_card", r"\b\d(?:[ -]?\d){12,18}\b"),
    (
        "api_key",
        r"\b(?:sk-ant-[A-Za-z0-9_-]{20,}|sk-(?:proj-)?[A-Za-z0-9_-]{20,}|AKIA[0-9A-Z]{16}|ghp_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{22,}|xox[abprs]-[A-Za-z0-9-]{10,}|AIza[0-9A-Za-z_-]{35})\b|Bearer\s+[A-Za-z0-9._~+/-]{16,}=*",
    ),
];

/// Attribute keys that carry prompt or completion text, in every convention (exact keys, then
/// prefixes).
const CONTENT_KEYS: [&str; 10] = [
    "gen_ai.input.messages",
    "gen_ai.output.messages",
    "gen_ai.system_instructions",
    "gen_ai.tool.call.arguments",
    "gen_ai.tool.call.result",
    "input.value",
    "output.value",
    "traceloop.entity.input",
    "traceloop.entity.output",
    "gen_ai.choice",
];
const CONTENT_PREFIXES: [&str; 4] =
    ["gen_ai.prompt.", "gen_ai.completion.", "llm.input_messages.", "llm.output_messages."];

/// Redaction settings (the `[redaction]` section).
#[derive(Debug, Clone, Default)]
pub struct RedactionConfig {
    /// Built-in rules to apply (`email`, `credit_card`, `api_key`).
    pub builtin: Vec<String>,
    /// Extra pattern rules: name and regular expression.
    pub patterns: Vec<(String, String)>,
    /// Attribute key globs whose values are masked whole.
    pub keys: Vec<String>,
    /// Drop prompt and completion text for every project.
    pub drop_content: bool,
    /// Drop prompt and completion text for these projects.
    pub drop_content_projects: Vec<String>,
}

struct Rule {
    name: String,
    regex: Regex,
    replacement: String,
    count: Counter,
    luhn: bool,
}

/// Applies the configured rules to decoded requests.
pub struct Redactor {
    rules: Vec<Rule>,
    set: RegexSet,
    keys: Vec<String>,
    key_count: Counter,
    drop_all: bool,
    drop_projects: HashSet<String>,
    dropped: Counter,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redactor")
            .field("rules", &self.rules.iter().map(|r| &r.name).collect::<Vec<_>>())
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

/// Whether `key` matches a glob with `*` wildcards.
pub fn glob_match(pattern: &str, key: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == key;
    }
    let mut rest = key;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            let Some(r) = rest.strip_prefix(part) else { return false };
            rest = r;
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            let Some(at) = rest.find(part) else { return false };
            rest = &rest[at + part.len()..];
        }
    }
    true
}

fn luhn(digits: &str) -> bool {
    let d: Vec<u32> = digits.chars().filter_map(|c| c.to_digit(10)).collect();
    if !(13..=19).contains(&d.len()) {
        return false;
    }
    let sum: u32 = d
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &x)| if i % 2 == 1 { if x * 2 > 9 { x * 2 - 9 } else { x * 2 } } else { x })
        .sum();
    sum.is_multiple_of(10)
}

impl Redactor {
    /// A redactor for `config`; an unknown built-in or an invalid pattern is an error naming it.
    pub fn new(config: &RedactionConfig) -> Result<Self, String> {
        let mut rules = Vec::new();
        for name in &config.builtin {
            let Some((_, pattern)) = BUILTIN.iter().find(|(n, _)| n == name) else {
                return Err(format!(
                    "unknown built-in redaction rule {name:?} (built-in: email, credit_card, api_key)"
                ));
            };
            rules.push((name.clone(), (*pattern).to_string()));
        }
        rules.extend(config.patterns.iter().cloned());
        let mut compiled = Vec::new();
        for (name, pattern) in &rules {
            let regex = Regex::new(pattern)
                .map_err(|e| format!("redaction rule {name:?}: invalid pattern: {e}"))?;
            compiled.push(Rule {
                name: name.clone(),
                regex,
                replacement: format!("[REDACTED:{name}]"),
                count: Counter::default(),
                luhn: name == "credit_card" && config.builtin.iter().any(|b| b == "credit_card"),
            });
        }
        let set = RegexSet::new(rules.iter().map(|(_, p)| p.as_str()))
            .map_err(|e| format!("redaction rules: {e}"))?;
        Ok(Self {
            rules: compiled,
            set,
            keys: config.keys.clone(),
            key_count: Counter::default(),
            drop_all: config.drop_content,
            drop_projects: config.drop_content_projects.iter().cloned().collect(),
            dropped: Counter::default(),
        })
    }

    /// Whether the redactor changes nothing.
    pub fn is_noop(&self) -> bool {
        self.rules.is_empty()
            && self.keys.is_empty()
            && !self.drop_all
            && self.drop_projects.is_empty()
    }

    /// Appends the redaction counters to an exposition.
    pub fn render(&self, e: &mut Exposition) {
        for r in &self.rules {
            e.labeled_counter(
                "spanlake_redactions_total",
                "Values masked by redaction rules at ingest",
                "rule",
                &r.name,
                r.count.get(),
            );
        }
        e.labeled_counter(
            "spanlake_redactions_total",
            "Values masked by redaction rules at ingest",
            "rule",
            "attribute_key",
            self.key_count.get(),
        );
        e.counter(
            "spanlake_content_dropped_total",
            "Prompt and completion attributes and events dropped at ingest",
            self.dropped.get(),
        );
    }

    /// A string with every pattern match masked; `None` when nothing matched.
    pub fn redact_str(&self, s: &str) -> Option<String> {
        let matched = self.set.matches(s);
        if !matched.matched_any() {
            return None;
        }
        let mut out = s.to_string();
        let mut changed = false;
        for i in matched.iter() {
            let rule = &self.rules[i];
            let mut n = 0;
            let next = rule
                .regex
                .replace_all(&out, |c: &regex::Captures<'_>| {
                    if rule.luhn && !luhn(&c[0]) {
                        return c[0].to_string();
                    }
                    n += 1;
                    rule.replacement.clone()
                })
                .into_owned();
            if n > 0 {
                rule.count.add(n);
                changed = true;
                out = next;
            }
        }
        changed.then_some(out)
    }

    fn value(&self, v: &mut AnyValue) {
        match &mut v.value {
            Some(any_value::Value::StringValue(s)) => {
                if let Some(r) = self.redact_str(s) {
                    *s = r;
                }
            }
            Some(any_value::Value::ArrayValue(a)) => {
                a.values.iter_mut().for_each(|v| self.value(v))
            }
            Some(any_value::Value::KvlistValue(kv)) => self.attributes(&mut kv.values),
            Some(any_value::Value::BytesValue(b)) => {
                if let Ok(text) = std::str::from_utf8(b)
                    && let Some(r) = self.redact_str(text)
                {
                    *b = r.into_bytes();
                }
            }
            _ => {}
        }
    }

    fn attributes(&self, attrs: &mut [KeyValue]) {
        for kv in attrs {
            if self.keys.iter().any(|k| glob_match(k, &kv.key)) {
                self.key_count.add(1);
                kv.value = Some(AnyValue {
                    value: Some(any_value::Value::StringValue("[REDACTED]".into())),
                });
            } else if let Some(v) = &mut kv.value {
                self.value(v);
            }
        }
    }

    fn text(&self, s: &mut String) {
        if let Some(r) = self.redact_str(s) {
            *s = r;
        }
    }

    fn drop_content(&self, attrs: &mut Vec<KeyValue>) {
        let before = attrs.len();
        attrs.retain(|kv| {
            !(CONTENT_KEYS.contains(&kv.key.as_str())
                || CONTENT_PREFIXES.iter().any(|p| kv.key.starts_with(p)))
        });
        self.dropped.add((before - attrs.len()) as u64);
    }

    /// Masks and drops what the rules say in `req`, sent to `project`.
    pub fn apply(&self, project: &str, req: &mut ExportTraceServiceRequest) {
        if self.is_noop() {
            return;
        }
        let drop = self.drop_all || self.drop_projects.contains(project);
        for rs in &mut req.resource_spans {
            if let Some(r) = &mut rs.resource {
                self.attributes(&mut r.attributes);
            }
            for ss in &mut rs.scope_spans {
                if let Some(scope) = &mut ss.scope {
                    self.attributes(&mut scope.attributes);
                }
                for span in &mut ss.spans {
                    if drop {
                        self.drop_content(&mut span.attributes);
                        let before = span.events.len();
                        span.events.retain(|e| !e.name.starts_with("gen_ai."));
                        self.dropped.add((before - span.events.len()) as u64);
                    }
                    self.text(&mut span.name);
                    self.attributes(&mut span.attributes);
                    if let Some(status) = &mut span.status {
                        self.text(&mut status.message);
                    }
                    for e in &mut span.events {
                        self.text(&mut e.name);
                        if drop {
                            self.drop_content(&mut e.attributes);
                        }
                        self.attributes(&mut e.attributes);
                    }
                    for l in &mut span.links {
                        self.attributes(&mut l.attributes);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_builtin() -> Redactor {
        Redactor::new(&RedactionConfig {
            builtin: vec!["email".into(), "credit_card".into(), "api_key".into()],
            keys: vec!["*.password".into()],
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn builtin_rules_mask_secrets_and_keep_the_rest() {
        let r = all_builtin();
        assert_eq!(
            r.redact_str("mail alice.smith@example.co.uk now").unwrap(),
            "mail [REDACTED:email] now"
        );
        assert_eq!(
            r.redact_str("card 4111 1111 1111 1111 ok").unwrap(),
            "card [REDACTED:credit_card] ok"
        );
        // 16 digits failing the Luhn check (an order number) stay.
        assert_eq!(r.redact_str("order 1234 5678 9012 3456"), None);
        assert_eq!(
            r.redact_str("key=sk-proj-Abcdefghijklmnopqrstuvwx1234 and AKIAABCDEFGHIJKLMNOP")
                .unwrap(),
            "key=[REDACTED:api_key] and [REDACTED:api_key]"
        );
        assert_eq!(
            r.redact_str("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.abc.def").unwrap(),
            "Authorization: [REDACTED:api_key]"
        );
        assert_eq!(r.redact_str("the weather in Paris is sunny, 22C"), None);
    }

    #[test]
    fn globs_and_bad_rules() {
        assert!(glob_match("*.password", "db.password"));
        assert!(glob_match("http.request.header.*", "http.request.header.authorization"));
        assert!(glob_match("a*c*e", "abcde"));
        assert!(!glob_match("*.password", "password_hint"));
        let e = Redactor::new(&RedactionConfig {
            patterns: vec![("broken".into(), "(".into())],
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.starts_with("redaction rule \"broken\": invalid pattern"), "{e}");
        let e =
            Redactor::new(&RedactionConfig { builtin: vec!["ssn".into()], ..Default::default() })
                .unwrap_err();
        assert!(e.contains("unknown built-in redaction rule \"ssn\""), "{e}");
    }
}

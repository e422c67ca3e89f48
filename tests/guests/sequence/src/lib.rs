//! A scripted provider: call N of `resolve` returns answer N of its settings (the last
//! one repeats), so tests can drive refreshes, changes and failures.
//!
//! `"service": "*"` answers every service; `"watch_at_once": true` makes a push provider
//! whose `watch` answers at once with the next call's answer; `"watch_loop": true` one
//! whose `watch` never returns.
//!
//! ```json
//! {"service": "seq", "tag_calls": false,
//!  "answers": [{"endpoints": ["http://a:1"], "ttl_ms": 1000}, {"error": "unavailable"}]}
//! ```

use std::cell::Cell;

use serde::Deserialize;
use wasd_sdk::{Configuration, Endpoint, Error, Provider, Query, Resolution};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    service: String,
    answers: Vec<Answer>,
    #[serde(default)]
    tag_calls: bool,
    /// Version every answer and answer `watch` at once with the next one: a provider
    /// that would spin if the host let it.
    #[serde(default)]
    watch_at_once: bool,
    /// Version every answer, and never return from `watch`: only the host's deadline
    /// for a watch call stops it.
    #[serde(default)]
    watch_loop: bool,
    /// From this wall-clock time (ms since the Unix epoch) on, every call loops: a
    /// provider that starts looping mid-run, in every instance the host makes.
    #[serde(default)]
    loop_from_unix_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Answer {
    #[serde(default)]
    endpoints: Vec<String>,
    ttl_ms: Option<u64>,
    error: Option<String>,
}

struct Sequence {
    settings: Settings,
    calls: Cell<usize>,
}

impl Provider for Sequence {
    fn configure(config: Configuration) -> Result<Self, Error> {
        let settings: Settings =
            serde_json::from_str(&config.settings).map_err(|e| Error::InvalidSettings(e.to_string()))?;
        if settings.answers.is_empty() {
            return Err(Error::InvalidSettings("answers is empty".into()));
        }
        Ok(Sequence {
            settings,
            calls: Cell::new(0),
        })
    }

    fn resolve(&self, query: Query) -> Result<Resolution, Error> {
        if self.settings.service != "*" && query.service != self.settings.service {
            return Ok(Resolution::empty());
        }
        if let Some(from) = self.settings.loop_from_unix_ms {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            if now >= from {
                loop {
                    std::hint::black_box(now);
                }
            }
        }
        let call = self.calls.get();
        self.calls.set(call + 1);
        let answer = &self.settings.answers[call.min(self.settings.answers.len() - 1)];
        if let Some(error) = &answer.error {
            return Err(match error.as_str() {
                "unavailable" => Error::Unavailable(format!("scripted failure at call {call}")),
                "not-found" => Error::NotFound("scripted".into()),
                "panic" => panic!("scripted panic at call {call}"),
                // Never returns: the host's time limit has to stop it.
                "loop" => loop {
                    std::hint::black_box(call);
                },
                other => Error::Internal(other.to_owned()),
            });
        }
        let mut endpoints = Vec::new();
        for value in &answer.endpoints {
            let mut endpoint = Endpoint::parse(value).map_err(|e| Error::Internal(e.to_string()))?;
            if self.settings.tag_calls {
                endpoint.metadata.push(("call".into(), call.to_string()));
            }
            endpoints.push(endpoint);
        }
        let mut resolution = Resolution::new(endpoints);
        resolution.ttl_ms = answer.ttl_ms;
        if self.settings.watch_at_once || self.settings.watch_loop {
            resolution.version = Some(call.to_string());
        }
        Ok(resolution)
    }

    fn watch(&self, query: Query, version: String, timeout_ms: u64) -> Result<Option<Resolution>, Error> {
        if self.settings.watch_loop {
            loop {
                std::hint::black_box(&version);
            }
        }
        if !self.settings.watch_at_once {
            return Err(Error::Unsupported("scripted polling provider".into()));
        }
        let _ = (version, timeout_ms);
        self.resolve(query).map(Some)
    }
}

wasd_sdk::export!(Sequence);

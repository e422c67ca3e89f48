//! The provider conformance suite: any provider module, in any language, loaded by the
//! real host under its default limits and held to the `wasd:provider@0.1.0` contract.
//!
//! Generic checks (every provider): it loads (exports present, WIT version, imports
//! the host offers); it answers a set of standard queries with endpoints, nothing, or a
//! fitting error variant, never a trap, a limit or an answer the host refuses; the same
//! query gets the same answer, also from many concurrent calls; thousands of calls stay
//! within its limits; a service it does not know falls through to the next provider.
//!
//! The `static-table` profile adds exact answers and exact `invalid-settings` messages
//! for providers implementing the example contract of `examples/providers/` (the same
//! provider in Rust, Python and JavaScript).
//!
//! Run it on any module: `cargo run -p wasd-tests --bin wasd-conformance -- MODULE.wasm`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use wasd::{Error, ProviderErrorKind, Query, Resolver};

/// Queries every provider must survive. Services most providers do not know: the
/// answer may well be empty; the point is how it answers.
pub const STANDARD_QUERIES: &[&str] = &[
    "basket",
    "https+http://basket",
    "https://_dashboard.basket",
    "http://basket:8080",
    "grpc://catalog",
    "_default.basket",
    "xn--bcher-kva",
    "a-service-name-of-sixty-three-characters-which-is-the-dns-limit",
];

/// A service no provider should know: the answer must let the chain go on.
pub const UNKNOWN_SERVICE: &str = "wasd-conformance-no-such-service";

/// What to run.
#[derive(Debug, Clone, Default)]
pub struct Suite {
    /// The provider's `settings`, as the body of a TOML inline table
    /// (`suffix = "cluster.local"`); none for an empty table.
    pub settings: Option<String>,
    /// Its `grants`, as the body of a TOML inline table.
    pub grants: Option<String>,
    /// More queries to put through the generic checks (services it knows).
    pub queries: Vec<String>,
    /// Also run the `static-table` profile (and, unless `settings` are given, run the
    /// generic checks with its standard table as settings).
    pub static_table: bool,
}

/// One check's result.
#[derive(Debug, Clone)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// `Ok(detail)` or `Err(why it failed)`.
    pub outcome: Result<String, String>,
}

/// Every check's result for one module.
#[derive(Debug, Clone)]
pub struct Report {
    /// The module.
    pub module: PathBuf,
    /// In the order run.
    pub checks: Vec<Check>,
}

impl Report {
    /// Whether every check passed.
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.outcome.is_ok())
    }

    /// The failed checks' names.
    pub fn failures(&self) -> Vec<&str> {
        let failed = self.checks.iter().filter(|c| c.outcome.is_err());
        failed.map(|c| c.name.as_str()).collect()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "conformance of {}", self.module.display())?;
        for check in &self.checks {
            match &check.outcome {
                Ok(detail) if detail.is_empty() => writeln!(f, "  pass  {}", check.name)?,
                Ok(detail) => writeln!(f, "  pass  {}: {detail}", check.name)?,
                Err(why) => writeln!(f, "  FAIL  {}: {why}", check.name)?,
            }
        }
        let failed = self.failures().len();
        write!(
            f,
            "{} of {} checks passed{}",
            self.checks.len() - failed,
            self.checks.len(),
            if failed == 0 { "" } else { " (FAILED)" }
        )
    }
}

impl Suite {
    /// Run the suite on `module`. Never panics on the module's behaviour: every
    /// problem is a failed check.
    pub async fn run(&self, module: &Path) -> Report {
        let mut report = Report {
            module: module.to_path_buf(),
            checks: Vec::new(),
        };
        let mut check = |name: &str, outcome: Result<String, String>| {
            report.checks.push(Check {
                name: name.to_owned(),
                outcome,
            })
        };
        // The static-table profile's standard table, unless settings are given: the
        // generic checks then run on real answers too.
        let default = if self.static_table { TABLE } else { "" };
        let settings = self.settings.as_deref().unwrap_or(default);
        let toml = config(module, settings, self.grants.as_deref().unwrap_or(""));

        // 1. It loads: `wasd check` explains what stops it, one line each.
        let checked = load_check(&toml).await;
        let loads = checked.is_ok();
        check("loads under the default limits", checked);
        if !loads {
            return report;
        }
        let resolver = match resolver(&toml).await {
            Ok(resolver) => resolver,
            Err(e) => {
                check("builds a resolver", Err(e.to_string()));
                return report;
            }
        };

        let mut queries: Vec<String> = STANDARD_QUERIES.iter().map(|q| q.to_string()).collect();
        queries.extend(self.queries.iter().cloned());

        // 2. Standard queries: endpoints, nothing, or a fitting error; never a fault.
        let mut answers = Vec::new();
        let mut problems = Vec::new();
        for text in &queries {
            let answer = answer(&resolver, text).await;
            if let Err(why) = &answer {
                problems.push(format!("{text}: {why}"));
            }
            answers.push(answer);
        }
        let count = |f: fn(&Answer) -> bool| answers.iter().filter(|a| a.as_ref().is_ok_and(f)).count();
        let with_endpoints = count(|a| matches!(a, Answer::Endpoints(_)));
        let declined = count(|a| matches!(a, Answer::Declined(_)));
        if problems.is_empty() && declined == queries.len() {
            problems.push(format!("declined every query, e.g. {:?}", answers[0]));
        }
        check(
            "answers the standard queries without faulting",
            if problems.is_empty() {
                Ok(format!(
                    "{with_endpoints} of {} with endpoints, {declined} declined",
                    queries.len()
                ))
            } else {
                Err(problems.join("; "))
            },
        );

        // 3. The same query, the same answer.
        let mut differ = Vec::new();
        for (text, first) in queries.iter().zip(&answers) {
            let again = answer(&resolver, text).await;
            if &again != first {
                differ.push(format!("{text}: {first:?} then {again:?}"));
            }
        }
        check(
            "answers the same query the same way",
            if differ.is_empty() {
                Ok(String::new())
            } else {
                Err(differ.join("; "))
            },
        );

        // 4. Called from many tasks at once (as many run in parallel as the runtime has
        // workers; the host gives each its own instance).
        let probe = queries
            .iter()
            .zip(&answers)
            .find(|(_, a)| matches!(a, Ok(Answer::Endpoints(_))))
            .map_or(&queries[0], |(q, _)| q);
        let expected = answer(&resolver, probe).await;
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..64 {
            let (resolver, probe) = (resolver.clone(), probe.clone());
            calls.spawn(async move { answer(&resolver, &probe).await });
        }
        let results = calls.join_all().await;
        let wrong = results.iter().filter(|r| **r != expected).count();
        check(
            "answers alike when called from 64 tasks at once",
            if wrong == 0 {
                Ok(probe.clone())
            } else {
                Err(format!(
                    "{wrong} of 64 calls for {probe} differed from {expected:?}"
                ))
            },
        );

        // 5. Many calls in a row on one instance: no fault (a fast leak or a creeping
        // call time would hit the memory or time limit).
        let parsed = Query::parse(probe).expect("standard queries parse");
        let faults = |resolver: &Resolver| resolver.provider_status().iter().map(|s| s.faults).sum::<u64>();
        let faults_before = faults(&resolver);
        let start = Instant::now();
        let mut fault = None;
        const MANY: u32 = 2_500;
        for i in 0..MANY {
            if let Err(e) = resolver.resolve_uncached(&parsed).await
                && let Err(why) = classify(&e)
            {
                fault = Some(format!("call {i}: {why}"));
                break;
            }
        }
        let per_call = start.elapsed() / MANY;
        let faults = faults(&resolver) - faults_before;
        check(
            "stays within its limits over 2 500 calls in a row",
            match fault {
                Some(why) => Err(why),
                None if faults > 0 => Err(format!("{faults} faults recorded")),
                None => Ok(format!("{} µs per call", per_call.as_micros())),
            },
        );

        // 6. An unknown service falls through: empty, or not-found (an error would be
        // logged as a failure on every miss).
        check(
            "lets the chain go on for a service it does not know",
            match answer(&resolver, UNKNOWN_SERVICE).await {
                Ok(Answer::Nothing) => Ok(String::new()),
                Ok(other) => Err(format!("answered {UNKNOWN_SERVICE} with {other:?}")),
                Err(why) => Err(why),
            },
        );

        if self.static_table {
            for (name, outcome) in static_table(module).await {
                check(&name, outcome);
            }
        }
        report
    }
}

/// A config of just this provider (no pass-through: an empty answer stays visible),
/// sharing the tests' precompiled-component cache.
fn config(module: &Path, settings: &str, grants: &str) -> String {
    format!(
        "pass-through = false\ncache-dir = {}\n[[provider]]\nname = \"subject\"\nmodule = {}\nsettings = {{ {settings} }}\ngrants = {{ {grants} }}\n",
        toml_string(&crate::cache_dir().display().to_string()),
        toml_string(&module.display().to_string())
    )
}

async fn load_check(toml: &str) -> Result<String, String> {
    let config = wasd::Config::from_toml(toml, Path::new(".")).map_err(|e| e.to_string())?;
    let reports = wasd::check(&config, &[]).await.map_err(|e| e.to_string())?;
    let report = reports
        .into_iter()
        .find(|r| r.provider == "subject")
        .ok_or("the provider is missing from the check")?;
    if report.problems.is_empty() {
        Ok(report.notes.join("; "))
    } else {
        Err(report.problems.join("; "))
    }
}

async fn resolver(toml: &str) -> Result<Resolver, Error> {
    Resolver::builder()
        .config_toml(toml)
        .plugin_dir(None)
        .cache_dir(Some(crate::cache_dir()))
        .watch_files(false)
        .build()
        .await
}

/// How a provider answered one query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Endpoints, as text (`https://10.0.0.7:8443 zone=a`).
    Endpoints(Vec<String>),
    /// Nothing here: an empty answer or `not-found`.
    Nothing,
    /// An error the contract allows for a query it cannot serve: `unavailable`,
    /// `denied`, `invalid-query` or `unsupported`.
    Declined(String),
}

/// The answer, or `Err` for a fault (a trap, a limit, an answer the host refused) or a
/// misused error variant.
async fn answer(resolver: &Resolver, text: &str) -> Result<Answer, String> {
    let query = Query::parse(text).map_err(|e| format!("the query does not parse: {e}"))?;
    match resolver.resolve_uncached(&query).await {
        Ok(set) => Ok(Answer::Endpoints(
            set.iter()
                .map(|e| {
                    let mut s = e.to_string();
                    if e.scheme().is_none()
                        && let Some(path) = e.path()
                    {
                        s.push_str(path);
                    }
                    for (k, v) in e.metadata() {
                        s.push_str(&format!(" {k}={v}"));
                    }
                    s
                })
                .collect(),
        )),
        Err(e) => classify(&e),
    }
}

fn classify(error: &Error) -> Result<Answer, String> {
    let Error::NoEndpoints { failures, .. } = error else {
        return Err(error.to_string());
    };
    let Some(failure) = failures.first() else {
        return Ok(Answer::Nothing);
    };
    match &failure.kind {
        ProviderErrorKind::InvalidQuery(_)
        | ProviderErrorKind::Unavailable(_)
        | ProviderErrorKind::Denied(_)
        | ProviderErrorKind::Unsupported(_) => Ok(Answer::Declined(failure.kind.to_string())),
        ProviderErrorKind::Internal(_) => Err(format!(
            "{} (internal: a standard query deserves an answer, not-found, or a specific error)",
            failure.kind
        )),
        kind => Err(kind.to_string()),
    }
}

/// A path as a TOML basic string.
fn toml_string(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

// ------------------------------------------------------------ static-table profile

/// The standard table every `static-table` provider is configured with (TOML inline
/// table body).
pub const TABLE: &str = r#"ttl-ms = 5000, services = { basket = [
    { host = "10.0.0.7", port = 8443, scheme = "https", metadata = { zone = "a" } },
    { host = "10.0.0.7", port = 8080, scheme = "http" },
    { host = "10.0.0.8", port = 9000, scheme = "http", name = "dashboard" },
    { host = "api.internal", path = "/v2", name = "api" },
], Catalog = [{ host = "10.0.1.1", port = 80, scheme = "http" }] }"#;

/// Query → expected endpoints (`None`: nothing here).
const EXPECTED: &[(&str, Option<&[&str]>)] = &[
    (
        "basket",
        Some(&["https://10.0.0.7:8443 zone=a", "http://10.0.0.7:8080"]),
    ),
    ("https+http://basket", Some(&["https://10.0.0.7:8443 zone=a"])),
    ("http://basket", Some(&["http://10.0.0.7:8080"])),
    ("grpc+http://basket", Some(&["http://10.0.0.7:8080"])),
    ("_dashboard.basket", Some(&["http://10.0.0.8:9000"])),
    ("https://_dashboard.basket", None),
    ("_api.basket", Some(&["api.internal/v2"])),
    ("_nothing.basket", None),
    ("catalog", Some(&["http://10.0.1.1:80"])),
    ("grpc://catalog", None),
    ("orders", None),
];

/// Settings → the exact `invalid-settings` message.
const REFUSED: &[(&str, &str)] = &[
    (
        r#"services = { basket = [{ host = "a" }, { host = "b", port = "x" }] }"#,
        r#"services.basket[1].port: expected an integer 0..65535, got "x""#,
    ),
    (r#"services = 5"#, "services: expected an object, got 5"),
    (
        r#"services = { a = [{ port = 1 }] }"#,
        r#"services.a[0]: missing "host""#,
    ),
    (
        r#"ttl = 5"#,
        r#"ttl: unknown key (expected "services" or "ttl-ms")"#,
    ),
    (
        r#"services = { a = [{ host = "h", port = 70000 }] }"#,
        "services.a[0].port: expected an integer 0..65535, got 70000",
    ),
];

async fn static_table(module: &Path) -> Vec<(String, Result<String, String>)> {
    let mut results = Vec::new();
    match resolver(&config(module, TABLE, "")).await {
        Err(e) => results.push((
            "static-table: accepts the standard table".into(),
            Err(e.to_string()),
        )),
        Ok(resolver) => {
            let mut wrong = Vec::new();
            for (query, expected) in EXPECTED {
                let got = answer(&resolver, query).await;
                let want = Ok(match expected {
                    Some(endpoints) => Answer::Endpoints(endpoints.iter().map(|s| s.to_string()).collect()),
                    None => Answer::Nothing,
                });
                if got != want {
                    wrong.push(format!("{query}: got {got:?}, want {want:?}"));
                }
            }
            results.push((
                format!("static-table: answers {} queries exactly", EXPECTED.len()),
                if wrong.is_empty() {
                    Ok(String::new())
                } else {
                    Err(wrong.join("; "))
                },
            ));
        }
    }
    let mut wrong = Vec::new();
    for (settings, message) in REFUSED {
        let want = format!("invalid settings: {message}");
        match resolver(&config(module, settings, "")).await {
            Ok(_) => wrong.push(format!("{{ {settings} }} was accepted")),
            Err(Error::Load { reason, .. }) if reason == want => {}
            Err(e) => wrong.push(format!("{{ {settings} }}: got `{e}`, want `{want}`")),
        }
    }
    results.push((
        format!(
            "static-table: refuses {} bad settings with invalid-settings naming the field",
            REFUSED.len()
        ),
        if wrong.is_empty() {
            Ok(String::new())
        } else {
            Err(wrong.join("; "))
        },
    ));
    results
}

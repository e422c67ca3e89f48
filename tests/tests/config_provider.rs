//! The configuration and pass-through providers through the host API: real components,
//! real files.

use wasd::{Error, ProviderErrorKind};
use wasd_tests::{Sandbox, strings};

const CATALOG: &str = r#"{
  "Logging": { "LogLevel": { "Default": "Information" } },
  "Services": {
    "catalog": {
      "https": ["https://127.0.0.1:8443", "https://10.46.24.90:443"]
    },
    "basket": {
      "https": "https://10.0.0.1:443",
      "http": ["http://10.0.0.1:80", "http://10.0.0.2:80"],
      "dashboard": "https://10.2.3.4:9999"
    },
    "orders": {
      "http": ["10.1.1.1:8080", "orders-1.internal:8080"]
    },
    "legacy": { "default": "legacy.internal:7000" },
    "Mixed": { "DEFAULT": ["https://10.9.9.1", "http://10.9.9.2"] }
  }
}"#;

const WITH_APPSETTINGS: &str = r#"
[[provider]]
builtin = "config"
grants = { files = ["appsettings.json"] }
"#;

async fn resolver_with(appsettings: &str, toml: &str) -> wasd::Resolver {
    let sandbox = Sandbox::new();
    sandbox.write("appsettings.json", appsettings);
    let resolver = sandbox.resolver(toml).await.expect("resolver builds");
    // The files were read at load: the folder may go.
    drop(sandbox);
    resolver
}

#[tokio::test]
async fn two_endpoint_catalog() {
    let r = resolver_with(CATALOG, WITH_APPSETTINGS).await;
    let set = r.resolve("https+http://catalog").await.unwrap();
    assert_eq!(
        strings(&set),
        ["https://127.0.0.1:8443", "https://10.46.24.90:443"]
    );
    assert_eq!(set.provider(), Some("config"));
    assert_eq!(r.providers(), ["config", "pass-through"]);
}

#[tokio::test]
async fn scheme_preference_and_fallback() {
    let r = resolver_with(CATALOG, WITH_APPSETTINGS).await;
    // https preferred when configured, never mixed with http.
    assert_eq!(
        strings(&r.resolve("https+http://basket").await.unwrap()),
        ["https://10.0.0.1:443"]
    );
    // The other order prefers http.
    assert_eq!(
        strings(&r.resolve("http+https://basket").await.unwrap()),
        ["http://10.0.0.1:80", "http://10.0.0.2:80"]
    );
    // No https for orders: fall back to http; bare host:port takes the section's scheme.
    assert_eq!(
        strings(&r.resolve("https+http://orders").await.unwrap()),
        ["http://10.1.1.1:8080", "http://orders-1.internal:8080"]
    );
    // The `default` section holds several schemes: the preferred one is kept.
    assert_eq!(
        strings(&r.resolve("https+http://mixed").await.unwrap()),
        ["https://10.9.9.1"]
    );
    assert_eq!(
        strings(&r.resolve("http://mixed").await.unwrap()),
        ["http://10.9.9.2"]
    );
}

#[tokio::test]
async fn named_and_default_endpoints() {
    let r = resolver_with(CATALOG, WITH_APPSETTINGS).await;
    assert_eq!(
        strings(&r.resolve("https://_dashboard.basket").await.unwrap()),
        ["https://10.2.3.4:9999"]
    );
    // The default endpoint, for a query with or without schemes.
    assert_eq!(
        strings(&r.resolve("legacy").await.unwrap()),
        ["legacy.internal:7000"]
    );
    assert_eq!(
        strings(&r.resolve("http://legacy").await.unwrap()),
        ["legacy.internal:7000"]
    );
    // Keys are case-insensitive, like .NET configuration keys.
    assert_eq!(strings(&r.resolve("HTTPS://CATALOG").await.unwrap()).len(), 2);
    // A named endpoint that does not exist is nothing here: pass-through answers.
    let set = r.resolve("https://_metrics.basket").await.unwrap();
    assert_eq!(set.provider(), Some("pass-through"));
}

#[tokio::test]
async fn pass_through_is_last_and_keeps_the_port() {
    let r = resolver_with(CATALOG, WITH_APPSETTINGS).await;
    let set = r.resolve("http://inventory:8081/api/items").await.unwrap();
    assert_eq!(strings(&set), ["http://inventory:8081"]);
    assert_eq!(set.provider(), Some("pass-through"));
    assert_eq!(strings(&r.resolve("inventory").await.unwrap()), ["inventory"]);
    assert_eq!(
        strings(&r.resolve("https+http://inventory").await.unwrap()),
        ["https://inventory"]
    );
}

#[tokio::test]
async fn no_endpoints_without_pass_through() {
    let toml = format!("pass-through = false\n{WITH_APPSETTINGS}");
    let r = resolver_with(CATALOG, &toml).await;
    match r.resolve("http://inventory").await {
        Err(Error::NoEndpoints { service, failures }) => {
            assert_eq!(service, "inventory");
            assert!(failures.is_empty());
        }
        other => panic!("expected NoEndpoints, got {other:?}"),
    }
    // The service has https endpoints only; an http-only query finds none.
    assert!(matches!(
        r.resolve("http://catalog").await,
        Err(Error::NoEndpoints { .. })
    ));
}

#[tokio::test]
async fn allowed_schemes_filter() {
    let toml = format!("allowed-schemes = [\"https\"]\n{WITH_APPSETTINGS}");
    let r = resolver_with(CATALOG, &toml).await;
    assert_eq!(
        strings(&r.resolve("https+http://basket").await.unwrap()),
        ["https://10.0.0.1:443"]
    );
    // No https for orders: http is not allowed, so nothing from config; pass-through
    // answers with the allowed scheme.
    let set = r.resolve("https+http://orders").await.unwrap();
    assert_eq!(set.provider(), Some("pass-through"));
    assert_eq!(strings(&set), ["https://orders"]);
    // A query without schemes gets the allowed ones.
    assert_eq!(
        strings(&r.resolve("basket").await.unwrap()),
        ["https://10.0.0.1:443"]
    );
    let err = r.resolve("http://basket").await.unwrap_err();
    assert!(matches!(err, Error::SchemeNotAllowed { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        "query 'http://basket': none of its schemes is allowed (allowed: https)"
    );
}

#[tokio::test]
async fn bad_queries_are_errors() {
    let r = resolver_with(CATALOG, WITH_APPSETTINGS).await;
    for query in ["", "http://", "http://basket:99999", "ba sket", "+://x"] {
        let err = r.resolve(query).await.expect_err(query);
        assert!(matches!(err, Error::InvalidQuery { .. }), "{query:?}: {err}");
    }
}

#[tokio::test]
async fn other_section_name() {
    let r = resolver_with(
        r#"{"Endpoints": {"catalog": {"http": "http://10.0.0.3:80"}}, "Services": {"catalog": {"http": "http://wrong"}}}"#,
        "[[provider]]\nbuiltin = \"config\"\nsettings = { section = \"Endpoints\" }\ngrants = { files = [\"appsettings.json\"] }\n",
    )
    .await;
    assert_eq!(
        strings(&r.resolve("http://catalog").await.unwrap()),
        ["http://10.0.0.3:80"]
    );
}

#[tokio::test]
async fn later_files_override_earlier_ones_key_by_key() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "appsettings.json",
        r#"{"Services": {"catalog": {"http": ["http://a:1", "http://b:2"]}}}"#,
    );
    sandbox.write(
        "appsettings.Production.json",
        r#"{"Services": {"catalog": {"http": ["http://c:3"]}}}"#,
    );
    let r = sandbox
        .resolver(
            "[[provider]]\nbuiltin = \"config\"\ngrants = { files = [\"appsettings.json\", \"appsettings.Production.json\", \"missing.json\"] }\n",
        )
        .await
        .unwrap();
    // Index 0 overridden, index 1 kept: .NET's layering.
    assert_eq!(
        strings(&r.resolve("http://catalog").await.unwrap()),
        ["http://c:3", "http://b:2"]
    );
}

async fn load_error(appsettings: &str) -> String {
    let sandbox = Sandbox::new();
    sandbox.write("appsettings.json", appsettings);
    match sandbox.resolver(WITH_APPSETTINGS).await {
        Err(e @ Error::Load { .. }) => e.to_string(),
        Err(other) => panic!("expected a load error, got {other}"),
        Ok(_) => panic!("expected a load error for {appsettings}"),
    }
}

#[tokio::test]
async fn bad_appsettings_name_file_and_key() {
    let err = load_error(r#"{"Services": {"catalog": {"http": ["http://a:1",]}}}"#).await;
    assert!(
        err.starts_with("provider 'config' (builtin:config) failed to load: invalid settings: appsettings.json: trailing comma at line 1 column"),
        "{err}"
    );
    let err = load_error(r#"{"Services": {"catalog": {"http": ["http://a:1", "http://b:port"]}}}"#).await;
    assert!(
        err.ends_with("invalid settings: appsettings.json: Services:catalog:http:1: 'http://b:port' is not a URI or host:port (the port is not a number from 0 to 65535)"),
        "{err}"
    );
    let err = load_error(r#"{"Services": {"catalog": "http://a:1"}}"#).await;
    assert!(
        err.contains("Services:catalog must be an object of endpoint names"),
        "{err}"
    );
    let err = load_error(r#"{"Services": {"catalog": {"http": {"first": "http://a:1"}}}}"#).await;
    assert!(
        err.contains("Services:catalog:http:first: expected a list index"),
        "{err}"
    );
    let err = load_error("[1, 2]").await;
    assert!(err.contains("appsettings.json: expected a JSON object"), "{err}");
}

#[tokio::test]
async fn bad_provider_settings_are_refused_at_load() {
    let sandbox = Sandbox::new();
    let err = sandbox
        .resolver("[[provider]]\nbuiltin = \"config\"\nsettings = { sectoin = \"Services\" }\n")
        .await
        .err()
        .expect("typo in settings refused");
    match &err {
        Error::Load { provider, reason, .. } => {
            assert_eq!(provider, "config");
            assert!(reason.contains("unknown field `sectoin`"), "{reason}");
        }
        other => panic!("{other}"),
    }
}

#[tokio::test]
async fn a_query_without_scheme_or_default_finds_nothing_in_config() {
    // Microsoft's rule: without schemes only the `default` endpoint is looked at.
    let r = resolver_with(CATALOG, &format!("pass-through = false\n{WITH_APPSETTINGS}")).await;
    assert!(matches!(
        r.resolve("catalog").await,
        Err(Error::NoEndpoints { .. })
    ));
}

#[tokio::test]
async fn a_plugin_listed_by_name_runs_before_pass_through() {
    let sandbox = Sandbox::new();
    std::fs::create_dir_all(sandbox.path().join("plugins")).unwrap();
    std::fs::copy(
        wasd_tests::fixtures::SEQUENCE,
        sandbox.path().join("plugins/static.wasm"),
    )
    .unwrap();
    let r = sandbox
        .resolver(
            r#"
[[provider]]
name = "static"
settings = { service = "seq", answers = [{ endpoints = ["http://10.1.2.3:80"] }] }
"#,
        )
        .await
        .unwrap();
    assert_eq!(r.providers(), ["static", "pass-through"]);
    let set = r.resolve("http://seq").await.unwrap();
    assert_eq!(
        (strings(&set), set.provider()),
        (vec!["http://10.1.2.3:80".to_owned()], Some("static"))
    );
    assert_eq!(
        r.resolve("http://other").await.unwrap().provider(),
        Some("pass-through")
    );
}

#[tokio::test]
async fn cached_resolves_do_not_enter_wasm() {
    let sandbox = Sandbox::new();
    let toml = format!(
        r#"
pass-through = false
[[provider]]
module = "{}"
settings = {{ service = "seq", tag_calls = true, answers = [{{ endpoints = ["http://a:1"] }}] }}
"#,
        wasd_tests::fixtures::SEQUENCE
    );
    let r = sandbox.resolver(&toml).await.unwrap();
    for _ in 0..5 {
        let set = r.resolve("http://seq").await.unwrap();
        // Call 0 every time: the provider was asked once.
        assert_eq!(set.endpoints()[0].metadata_value("call"), Some("0"));
    }
    // A different query (another scheme list) is another cache entry.
    let set = r.resolve("http+https://seq").await.unwrap();
    assert_eq!(set.endpoints()[0].metadata_value("call"), Some("1"));
}

#[tokio::test]
async fn provider_failures_are_reported_never_papered_over_by_pass_through() {
    let sandbox = Sandbox::new();
    let toml = format!(
        r#"
[[provider]]
name = "flaky"
module = "{}"
settings = {{ service = "seq", answers = [{{ error = "unavailable" }}] }}
"#,
        wasd_tests::fixtures::SEQUENCE
    );
    // With pass-through on (the default) or off, the resolve fails naming the failed
    // provider: pass-through never stands in for a provider that failed.
    for toml in [toml.clone(), format!("pass-through = false\n{toml}")] {
        let r = sandbox.resolver(&toml).await.unwrap();
        match r.resolve("http://seq").await {
            Err(Error::NoEndpoints { failures, .. }) => {
                assert_eq!(failures.len(), 1);
                assert_eq!(failures[0].provider, "flaky");
                assert!(
                    matches!(&failures[0].kind, ProviderErrorKind::Unavailable(m) if m.contains("scripted failure"))
                );
            }
            other => panic!("expected NoEndpoints naming 'flaky', got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_trapping_provider_is_contained() {
    let sandbox = Sandbox::new();
    let toml = format!(
        r#"
[[provider]]
name = "crashy"
module = "{}"
settings = {{ service = "seq", answers = [{{ error = "panic" }}, {{ endpoints = ["http://ok:1"] }}] }}
"#,
        wasd_tests::fixtures::SEQUENCE
    );
    let r = sandbox
        .resolver(&format!("pass-through = false\n{toml}"))
        .await
        .unwrap();
    match r.resolve("http://seq").await {
        Err(Error::NoEndpoints { failures, .. }) => match &failures[0].kind {
            ProviderErrorKind::Trap(message) => {
                assert!(message.contains("scripted panic at call 0"), "{message}")
            }
            other => panic!("expected a trap, got {other:?}"),
        },
        other => panic!("expected NoEndpoints, got {other:?}"),
    }
    // The trapped instance was discarded: the next call runs in a fresh one, whose
    // counter starts again at 0 (a reused instance would refuse to run at all).
    match r.resolve("http://seq").await {
        Err(Error::NoEndpoints { failures, .. }) => {
            assert!(
                matches!(&failures[0].kind, ProviderErrorKind::Trap(m) if m.contains("scripted panic at call 0")),
                "{failures:?}"
            )
        }
        other => panic!("expected NoEndpoints, got {other:?}"),
    }
}

//! The conformance suite run on the example providers in three languages (built from
//! source: Rust with cargo, Python with componentize-py, JavaScript with
//! componentize-js), and on fixtures that must fail it, so a suite that passes
//! everything would be caught.

use wasd_tests::conformance::Suite;
use wasd_tests::{Sandbox, example_provider, fixtures, run};

fn static_table() -> Suite {
    Suite {
        static_table: true,
        ..Suite::default()
    }
}

async fn passes(language: &str) {
    let module = example_provider(language);
    let report = static_table().run(&module).await;
    println!("{report}");
    assert!(report.passed(), "{report}");
    assert_eq!(report.checks.len(), 8, "{report}");
    // The generic checks ran on real answers: the table's `basket`.
    assert!(
        report.to_string().contains("3 of 8 with endpoints, 0 declined"),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn rust_example_conforms() {
    passes("rust").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn python_example_conforms() {
    passes("python").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn javascript_example_conforms() {
    passes("javascript").await;
}

/// Each example loads from the plugin folder of the `wasd` CLI and answers there.
#[test]
fn examples_load_from_the_plugin_folder() {
    let sandbox = Sandbox::new();
    let mut toml = String::from("pass-through = false\nplugin-dir = \"plugins\"\n");
    for language in ["rust", "python", "javascript"] {
        let module = std::fs::read(example_provider(language)).unwrap();
        sandbox.write(&format!("plugins/{language}-table.wasm"), module);
        // Listed by name to give it settings; it still comes from the folder.
        toml.push_str(&format!(
            "[[provider]]\nname = \"{language}-table\"\nsettings = {{ services = {{ {language} = [{{ host = \"10.0.0.1\", port = 80, scheme = \"http\" }}] }} }}\n"
        ));
    }
    sandbox.write("wasd.toml", &toml);
    let out = run(sandbox.wasd().args(["check"]));
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    for language in ["rust", "python", "javascript"] {
        let out = run(sandbox.wasd().args(["resolve", "--json", language]));
        assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
        let json: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(json["endpoints"][0]["endpoint"], "http://10.0.0.1:80", "{json}");
        assert_eq!(
            json["endpoints"][0]["provider"],
            format!("{language}-table"),
            "{json}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_simple_rust_provider_passes_the_generic_checks() {
    let suite = Suite {
        queries: vec!["fixed".into()],
        ..Suite::default()
    };
    let report = suite.run(fixtures::FIXED_A.as_ref()).await;
    assert!(report.passed(), "{report}");
    assert!(
        report.to_string().contains("1 of 9 with endpoints, 0 declined"),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_provider_that_traps_fails() {
    let suite = Suite {
        queries: vec!["panic".into()],
        ..Suite::default()
    };
    let report = suite.run(fixtures::HOSTILE.as_ref()).await;
    assert_eq!(
        report.failures(),
        ["answers the standard queries without faulting"],
        "{report}"
    );
    assert!(report.to_string().contains("panic: trapped: "), "{report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_provider_misusing_internal_fails() {
    let suite = Suite {
        settings: Some(r#"service = "basket", answers = [{ error = "internal" }]"#.into()),
        ..Suite::default()
    };
    let report = suite.run(fixtures::SEQUENCE.as_ref()).await;
    assert!(
        report
            .failures()
            .contains(&"answers the standard queries without faulting"),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_provider_changing_its_answer_or_declining_everything_fails() {
    // Call 0 answers a, every later call b: the second round differs from the first.
    let changing = Suite {
        settings: Some(
            r#"service = "basket", answers = [{ endpoints = ["http://a:1"] }, { endpoints = ["http://b:1"] }]"#.into(),
        ),
        ..Suite::default()
    };
    let report = changing.run(fixtures::SEQUENCE.as_ref()).await;
    assert!(
        report.failures().contains(&"answers the same query the same way"),
        "{report}"
    );
    // `unavailable` to everything, the unknown service included.
    let declining = Suite {
        settings: Some(r#"service = "*", answers = [{ error = "unavailable" }]"#.into()),
        ..Suite::default()
    };
    let report = declining.run(fixtures::SEQUENCE.as_ref()).await;
    let failures = report.failures();
    assert!(
        failures.contains(&"answers the standard queries without faulting"),
        "{report}"
    );
    assert!(
        failures.contains(&"lets the chain go on for a service it does not know"),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_provider_answering_everything_fails_the_fall_through_check() {
    // The static-table profile run on a provider that is not one fails it too.
    let suite = Suite {
        settings: Some(
            r#"service = "wasd-conformance-no-such-service", answers = [{ endpoints = ["http://a:1"] }]"#
                .into(),
        ),
        static_table: true,
        ..Suite::default()
    };
    let report = suite.run(fixtures::SEQUENCE.as_ref()).await;
    let failures = report.failures();
    assert!(
        failures.contains(&"lets the chain go on for a service it does not know"),
        "{report}"
    );
    assert!(
        failures.iter().any(|f| f.starts_with("static-table:")),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn modules_that_are_not_providers_fail_to_load_with_the_reason() {
    let report = Suite::default().run(fixtures::NOT_A_PROVIDER.as_ref()).await;
    assert_eq!(report.failures(), ["loads under the default limits"], "{report}");
    assert!(
        report
            .to_string()
            .contains("does not export wasd:provider/resolver@0.1.0"),
        "{report}"
    );
    let report = Suite::default().run(fixtures::WRONG_VERSION.as_ref()).await;
    assert!(
        report
            .to_string()
            .contains("a WIT version this host does not support"),
        "{report}"
    );
}

#[test]
fn check_explains_each_problem_in_one_line() {
    let sandbox = Sandbox::new();
    // A component importing an interface the host does not offer and exporting nothing.
    let alien = wat::parse_str(
        r#"(component
             (import "acme:cache/store@1.0.0" (instance (export "get" (func (param "k" string) (result string))))))"#,
    )
    .unwrap();
    let alien = sandbox.write("alien.wasm", alien);
    // The dns-srv provider needs a DNS grant it is not given; the etcd provider names
    // an endpoint its HTTP grant leaves out.
    sandbox.write(
        "wasd.toml",
        "[[provider]]\nbuiltin = \"dns-srv\"\nsettings = { suffix = \"cluster.local\" }\n\
         [[provider]]\nbuiltin = \"etcd\"\nsettings = { endpoints = [\"http://127.0.0.1:2379\", \"http://10.9.9.9:2379\"] }\n\
         grants = { http = [\"http://127.0.0.1:2379\"] }\n",
    );
    // A module file that is empty (a copy that has not started).
    let empty = sandbox.write("empty.wasm", "");
    let out = run(sandbox
        .wasd()
        .arg("check")
        .arg(&alien)
        .arg(fixtures::WRONG_VERSION)
        .arg(&empty));
    assert_eq!(out.code, 1, "{}", out.stdout);
    let lines: Vec<&str> = out.stdout.lines().collect();
    let has = |start: &str, text: &str| lines.iter().any(|l| l.starts_with(start) && l.contains(text));
    assert!(
        has(
            "error  alien",
            "imports acme:cache/store@1.0.0, which this host does not offer"
        ),
        "{}",
        out.stdout
    );
    assert!(
        has(
            "error  alien",
            "does not export wasd:provider/resolver@0.1.0, so it is not a provider (it exports nothing)"
        ),
        "{}",
        out.stdout
    );
    // Another WIT version: one line, naming the version it was built for and the one
    // the host speaks.
    let wrong: Vec<&&str> = lines.iter().filter(|l| l.contains("wrong-version")).collect();
    assert_eq!(wrong.len(), 1, "{}", out.stdout);
    assert!(
        wrong[0].starts_with("error  wrong-version")
            && wrong[0].contains("a WIT version this host does not support: it was built for wasd:provider@")
            && wrong[0].contains("this host speaks wasd:provider@0.1.0"),
        "{}",
        out.stdout
    );
    // A standard provider whose settings reach outside its grants fails at run time:
    // an error here, not a note.
    assert!(
        has(
            "error  dns-srv",
            "settings.suffix asks for names like _default._tcp.svc.cluster.local, which grants.dns [] does not cover"
        ),
        "{}",
        out.stdout
    );
    assert!(
        has(
            "error  etcd",
            "settings.endpoints names http://10.9.9.9:2379, which grants.http [http://127.0.0.1:2379] does not cover"
        ),
        "{}",
        out.stdout
    );
    assert!(
        !lines.iter().any(|l| l.contains("http://127.0.0.1:2379, which")),
        "{}",
        out.stdout
    );
    assert!(has("error  empty", "the module file is empty"), "{}", out.stdout);
    assert!(!has("ok     dns-srv", ""), "{}", out.stdout);
}

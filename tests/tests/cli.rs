//! The `wasd` command, driven as a subprocess: its output is a contract.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use wasd_tests::{Sandbox, run};

const APPSETTINGS: &str = r#"{"Services": {
  "catalog": {"https": ["https://127.0.0.1:8443", "https://10.46.24.90:443"]},
  "basket": {"http": "http://10.0.0.1:80", "dashboard": "https://10.2.3.4:9999"}
}}"#;

fn json(stdout: &str) -> Value {
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

#[test]
fn resolve_json_on_builtin_defaults() {
    let sandbox = Sandbox::new();
    sandbox.write("appsettings.json", APPSETTINGS);
    let out = run(sandbox.wasd().args(["resolve", "https+http://catalog", "--json"]));
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.stdout.lines().count(), 1, "one JSON object: {}", out.stdout);
    let v = json(&out.stdout);
    assert_eq!(v["query"], "https+http://catalog");
    assert_eq!(v["service"], "catalog");
    let endpoints = v["endpoints"].as_array().unwrap();
    assert_eq!(endpoints.len(), 2);
    assert_eq!(endpoints[0]["endpoint"], "https://127.0.0.1:8443");
    assert_eq!(endpoints[1]["endpoint"], "https://10.46.24.90:443");
    assert_eq!(endpoints[0]["provider"], "config");
    assert_eq!(endpoints[0]["port"], 8443);
}

#[test]
fn resolve_plain_prints_one_endpoint_per_line() {
    let sandbox = Sandbox::new();
    sandbox.write("appsettings.json", APPSETTINGS);
    let out = run(sandbox.wasd().args(["resolve", "https://_dashboard.basket"]));
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (0, "https://10.2.3.4:9999\n"),
        "{}",
        out.stderr
    );
    let out = run(sandbox.wasd().args(["resolve", "https+http://catalog"]));
    assert_eq!(out.stdout, "https://127.0.0.1:8443\nhttps://10.46.24.90:443\n");
}

#[test]
fn aspire_environment_variables() {
    let sandbox = Sandbox::new();
    let out = run(sandbox
        .wasd()
        .args(["resolve", "https+http://catalog", "--json"])
        .env("services__catalog__https__0", "https://10.0.0.5:8443")
        .env("SERVICES__Catalog__HTTPS__1", "https://10.0.0.6:8443")
        .env("services__catalog__http__0", "http://10.0.0.5:8080"));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v = json(&out.stdout);
    let endpoints: Vec<&str> = v["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["endpoint"].as_str().unwrap())
        .collect();
    assert_eq!(endpoints, ["https://10.0.0.5:8443", "https://10.0.0.6:8443"]);
    assert_eq!(v["endpoints"][0]["provider"], "config");
}

#[test]
fn environment_overrides_appsettings() {
    let sandbox = Sandbox::new();
    sandbox.write("appsettings.json", APPSETTINGS);
    let out = run(sandbox
        .wasd()
        .args(["resolve", "http://basket"])
        .env("services__basket__http", "http://10.7.7.7:80"));
    assert_eq!(out.stdout, "http://10.7.7.7:80\n", "{}", out.stderr);
}

#[test]
fn environment_variables_are_denied_unless_granted() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "wasd.toml",
        "[[provider]]\nbuiltin = \"config\"\ngrants = { files = [\"appsettings.json\"] }\n",
    );
    let out = run(sandbox
        .wasd()
        .args(["resolve", "http://web", "--json"])
        .env("services__web__http__0", "http://10.0.0.9:80"));
    assert_eq!(out.code, 0, "{}", out.stderr);
    // Not granted: the config provider never saw the variable.
    assert_eq!(json(&out.stdout)["endpoints"][0]["provider"], "pass-through");
}

#[test]
fn a_single_value_wins_over_a_list() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "appsettings.json",
        r#"{"Services": {"web": {"http": ["http://a:1", "http://b:2"]}}}"#,
    );
    let out = run(sandbox
        .wasd()
        .args(["resolve", "http://web"])
        .env("services__web__http", "http://c:3"));
    assert_eq!(out.stdout, "http://c:3\n", "{}", out.stderr);
}

#[test]
fn pass_through_json() {
    let sandbox = Sandbox::new();
    let out = run(sandbox
        .wasd()
        .args(["resolve", "http://inventory:8081/items", "--json"]));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v = json(&out.stdout);
    assert_eq!(v["endpoints"][0]["endpoint"], "http://inventory:8081");
    assert_eq!(v["endpoints"][0]["provider"], "pass-through");
}

#[test]
fn config_from_flag_env_and_working_directory() {
    let sandbox = Sandbox::new();
    sandbox.write("conf/appsettings.json", APPSETTINGS);
    sandbox.write(
        "conf/custom.toml",
        "pass-through = false\n[[provider]]\nbuiltin = \"config\"\ngrants = { files = [\"appsettings.json\"] }\n",
    );
    // --config; paths in it are relative to the file.
    let out = run(sandbox
        .wasd()
        .args(["resolve", "http://basket", "--config", "conf/custom.toml"]));
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (0, "http://10.0.0.1:80\n"),
        "{}",
        out.stderr
    );
    // pass-through = false took effect: an unknown service fails.
    let out = run(sandbox
        .wasd()
        .args(["resolve", "http://unknown", "--config", "conf/custom.toml"]));
    assert_ne!(out.code, 0);
    assert_eq!(out.stderr, "wasd: no endpoints for service 'unknown'\n");
    // WASD_CONFIG.
    let out = run(sandbox
        .wasd()
        .args(["resolve", "http://basket"])
        .env("WASD_CONFIG", "conf/custom.toml"));
    assert_eq!(out.stdout, "http://10.0.0.1:80\n", "{}", out.stderr);
    // ./wasd.toml.
    let conf = Sandbox::new();
    conf.write("appsettings.json", APPSETTINGS);
    conf.write("wasd.toml", "pass-through = false\n[[provider]]\nbuiltin = \"config\"\ngrants = { files = [\"appsettings.json\"] }\n");
    let out = run(conf.wasd().args(["resolve", "http://unknown"]));
    assert_ne!(out.code, 0, "./wasd.toml disabled pass-through");
}

#[test]
fn bad_input_fails_with_one_line() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "bad.toml",
        "[[provider]]\nbuiltin = \"config\"\ngrants = { filez = [] }\n",
    );
    sandbox.write("broken-settings/appsettings.json", "{\"Services\": ");
    sandbox.write(
        "broken-settings/wasd.toml",
        "[[provider]]\nbuiltin = \"config\"\ngrants = { files = [\"appsettings.json\"] }\n",
    );
    for (args, expected) in [
        (
            vec!["resolve", "http://bas ket"],
            "wasd: invalid query 'http://bas ket': the service name 'bas ket' contains ' ', which a host name cannot",
        ),
        (
            vec!["resolve", "basket", "--config", "bad.toml"],
            "wasd: bad.toml:3:12: unknown field `filez`, expected one of `files`, `env`, `dns`, `http`",
        ),
        (
            vec!["resolve", "basket", "--config", "missing.toml"],
            "wasd: missing.toml: cannot read the config file",
        ),
        (
            vec!["resolve", "basket", "--config", "broken-settings/wasd.toml"],
            "wasd: provider 'config' (builtin:config) failed to load: invalid settings: appsettings.json: EOF while parsing",
        ),
    ] {
        let out = run(sandbox.wasd().args(&args));
        assert_ne!(out.code, 0, "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}: {}", out.stdout);
        assert_eq!(out.stderr.lines().count(), 1, "{args:?}: {}", out.stderr);
        assert!(
            out.stderr.starts_with(expected),
            "{args:?}\n  got: {}\n want: {expected}",
            out.stderr
        );
    }
}

#[test]
fn check_reports_every_module() {
    let sandbox = Sandbox::new();
    sandbox.write("appsettings.json", APPSETTINGS);
    sandbox.write(
        "wasd.toml",
        "[[provider]]\nbuiltin = \"config\"\ngrants = { files = [\"appsettings.json\"] }\n",
    );
    let out = run(sandbox.wasd().arg("check"));
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("ok     config (builtin:config)"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("ok     pass-through (builtin:pass-through)"),
        "{}",
        out.stdout
    );

    // A plugin folder with a file that is no component, and a module named on the
    // command line that is a real component.
    sandbox.write("plugins/garbage.wasm", b"\0asm not really");
    let out = run(sandbox.wasd().args(["check", wasd_tests::fixtures::SEQUENCE]));
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert!(out.stdout.contains("error  garbage ("), "{}", out.stdout);
    assert!(out.stdout.contains("not a loadable component"), "{}", out.stdout);
    // The fixture loads but refuses empty settings, and says so.
    assert!(out.stdout.contains("error  sequence ("), "{}", out.stdout);
    assert!(
        out.stdout.contains("invalid settings: missing field `service`"),
        "{}",
        out.stdout
    );
}

#[test]
fn watch_prints_the_set_then_changes() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "wasd.toml",
        format!(
            r#"
pass-through = false
[[provider]]
module = "{}"
settings = {{ service = "seq", answers = [
  {{ endpoints = ["http://a:1"], ttl_ms = 1000 }},
  {{ endpoints = ["http://b:2"], ttl_ms = 1000 }},
] }}
"#,
            wasd_tests::fixtures::SEQUENCE
        ),
    );
    let mut child = sandbox
        .wasd()
        .args(["watch", "http://seq", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in lines.by_ref() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let first = json(&rx.recv_timeout(Duration::from_secs(30)).expect("current set"));
    assert_eq!(first["endpoints"][0]["endpoint"], "http://a:1");
    let second = json(&rx.recv_timeout(Duration::from_secs(10)).expect("a change"));
    assert_eq!(second["endpoints"][0]["endpoint"], "http://b:2");
    assert_eq!(second["query"], "http://seq");
    // SIGTERM ends it cleanly.
    let pid = child.id().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    // Nothing more was printed: the last answer repeats, which is no change.
    assert!(rx.try_recv().is_err());
}

#[test]
fn components_are_compiled_once_and_cached() {
    let sandbox = Sandbox::new();
    let cache = sandbox.path().join("cache");
    let out = run(sandbox
        .wasd()
        .args(["resolve", "basket"])
        .env("XDG_CACHE_HOME", &cache));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let cached: Vec<_> = std::fs::read_dir(cache.join("wasd"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    // The two providers of the built-in defaults, precompiled.
    assert_eq!(
        cached
            .iter()
            .filter(|p| p.extension().is_some_and(|x| x == "cwasm"))
            .count(),
        2,
        "{cached:?}"
    );
    let stamp = |p: &std::path::Path| std::fs::metadata(p).unwrap().modified().unwrap();
    let before: Vec<_> = cached.iter().map(|p| stamp(p)).collect();
    // A second run loads them instead of compiling and writing again.
    let out = run(sandbox
        .wasd()
        .args(["resolve", "basket"])
        .env("XDG_CACHE_HOME", &cache));
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(cached.iter().map(|p| stamp(p)).collect::<Vec<_>>(), before);
}

/// `wasd ARGS` on a terminal: util-linux `script` runs it on a pty (in the sandbox,
/// with a clean environment and this compile cache) and relays what it wrote.
fn on_a_terminal(sandbox: &Sandbox, args: &str, cache: &std::path::Path) -> wasd_tests::Output {
    let mut script = std::process::Command::new("script");
    script.current_dir(sandbox.path()).env_clear();
    for keep in ["PATH", "HOME"] {
        if let Some(value) = std::env::var_os(keep) {
            script.env(keep, value);
        }
    }
    let command = format!("{} {args}", wasd_tests::wasd_bin().display());
    run(script
        .args(["-qec", &command, "/dev/null"])
        .env("TERM", "xterm")
        .env("XDG_CACHE_HOME", cache))
}

#[test]
fn a_first_compile_shows_progress_on_a_terminal_and_a_note_in_the_log() {
    // A fresh compile cache: the built-in providers compile on this run.
    let sandbox = Sandbox::new();
    let cache = sandbox.path().join("cache");

    // On a terminal: a spinner naming the provider, its size, and why.
    let out = on_a_terminal(&sandbox, "resolve basket", &cache);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("compiling provider 'config' (") && out.stdout.contains(" MB, first run only)"),
        "{:?}",
        out.stdout
    );
    // Compiled now: no spinner on the next run.
    let again = on_a_terminal(&sandbox, "resolve basket", &cache);
    assert_eq!(again.code, 0, "{}{}", again.stdout, again.stderr);
    assert!(!again.stdout.contains("compiling"), "{:?}", again.stdout);

    // Not a terminal: nothing but the answer, even when compiling; at debug level,
    // one line says it.
    let quiet = run(sandbox
        .wasd()
        .args(["resolve", "basket"])
        .env("XDG_CACHE_HOME", sandbox.path().join("fresh")));
    assert_eq!(quiet.code, 0, "{}", quiet.stderr);
    assert_eq!(quiet.stderr, "");
    let logged = run(sandbox
        .wasd()
        .args(["resolve", "basket"])
        .env("XDG_CACHE_HOME", sandbox.path().join("fresh-2"))
        .env("WASD_LOG", "wasd_sandbox=debug"));
    let notes: Vec<&str> = logged
        .stderr
        .lines()
        .filter(|l| l.contains("compiling provider 'config' (") && l.contains(" MB, first run only)"))
        .collect();
    assert_eq!(notes.len(), 1, "{}", logged.stderr);
}

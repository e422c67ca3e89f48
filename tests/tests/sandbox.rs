//! Hostile providers (tests/guests/hostile, built from source) against the sandbox:
//! every attack fails only its own call, with an error naming the provider and the
//! limit; the host stays up, no later provider papers over the failure, and other
//! resolves keep flowing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use wasd_tests::{Sandbox, fixtures, run, strings};

/// The hostile provider alone, so its failure is the error the caller sees.
fn alone(limits: &str) -> String {
    format!(
        "pass-through = false\n[[provider]]\nname = \"hostile\"\nmodule = \"{}\"\nlimits = {{ {limits} }}\n",
        fixtures::HOSTILE
    )
}

const LIMITS: &str = r#"timeout = "500ms", max-memory = "32MiB", max-endpoints = 1000"#;

/// The hostile provider first, then the configuration provider that knows every
/// service, then pass-through.
fn chain(sandbox: &Sandbox) -> String {
    let services: Vec<String> = ATTACKS
        .iter()
        .map(|(name, _)| format!(r#""{name}": {{"http": ["http://10.8.0.1:80"]}}"#))
        .collect();
    sandbox.write(
        "appsettings.json",
        format!(r#"{{"Services": {{{}}}}}"#, services.join(",")),
    );
    format!(
        "{}[[provider]]\nbuiltin = \"config\"\ngrants = {{ files = [\"appsettings.json\"] }}\n",
        alone(LIMITS).replace("pass-through = false", "pass-through = true")
    )
}

/// Each attack, and what the caller must be told when it is alone.
const ATTACKS: &[(&str, &str)] = &[
    (
        "loop",
        "provider 'hostile': exceeded its time limit (500 ms per call)",
    ),
    ("bomb", "provider 'hostile': exceeded its memory limit (32 MiB"),
    (
        "recurse",
        "provider 'hostile': exceeded its stack limit (stack overflow)",
    ),
    ("panic", "provider 'hostile': trapped: "),
    (
        "huge",
        "provider 'hostile': answer refused: 200000 endpoints, more than its limit of 1000",
    ),
    ("long", "provider 'hostile': answer refused: host 'aaaa"),
    (
        "files",
        "provider 'hostile': capability denied: reading /etc/passwd: ",
    ),
    (
        "env",
        "provider 'hostile': capability denied: WASD_TEST_SECRET: environment variable not found",
    ),
    (
        "http",
        "provider 'hostile': capability denied: HTTP request denied by the host: http://127.0.0.1:",
    ),
    (
        "dns",
        "provider 'hostile': capability denied: secret.internal: DnsError::Denied(\"provider 'hostile' may not look up",
    ),
    // wasmtime-wasi's own refusals (TCP, UDP and name lookup are off), as wasi-libc
    // reports them to the guest.
    (
        "tcp-connect",
        "provider 'hostile': capability denied: tcp connect: Permission denied (os error 2)",
    ),
    (
        "tcp-listen",
        "provider 'hostile': capability denied: tcp listen: Permission denied (os error 2)",
    ),
    (
        "udp-send",
        "provider 'hostile': capability denied: udp send: Permission denied (os error 2)",
    ),
    (
        "name-lookup",
        "provider 'hostile': capability denied: looking up localhost: failed to lookup address information: Non-recoverable error",
    ),
];

async fn resolver(sandbox: &Sandbox, toml: &str) -> wasd::Resolver {
    sandbox.resolver(toml).await.expect("the host config loads")
}

#[tokio::test(flavor = "multi_thread")]
async fn every_attack_fails_only_its_own_call_with_a_clear_error() {
    // In the environment providers are given, but not granted: the provider must not
    // see it.
    let env = [("WASD_TEST_SECRET", "hunter2")];
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp_port = udp.local_addr().unwrap().port();
    let sandbox = Sandbox::new();
    for (attack, expected) in ATTACKS {
        // A fresh provider each time, so faults do not add up to a quarantine here.
        let resolver = sandbox
            .resolver_with_env(&alone(LIMITS), &env)
            .await
            .expect("the host config loads");
        let query = match *attack {
            "http" | "tcp-connect" => format!("{attack}:{port}"),
            "udp-send" => format!("{attack}:{udp_port}"),
            _ => attack.to_string(),
        };
        let err = resolver.resolve(&query).await.unwrap_err().to_string();
        assert!(err.contains(expected), "{attack}: {err}");
        assert!(
            !err.contains("leaked") && !err.contains("hunter2"),
            "{attack}: {err}"
        );
        assert!(err.len() < 2000, "{attack}: an error of {} bytes", err.len());
        // The same provider answers the next call from a fresh instance.
        let ok = resolver.resolve("unknown-service").await.unwrap_err().to_string();
        assert_eq!(ok, "no endpoints for service 'unknown-service'", "after {attack}");
    }
    // Nothing was accepted on the port the provider was refused, and no datagram
    // arrived.
    listener.set_nonblocking(true).unwrap();
    assert!(listener.accept().is_err());
    udp.set_nonblocking(true).unwrap();
    let mut datagram = [0u8; 64];
    let received = udp.recv_from(&mut datagram);
    assert_eq!(
        received.map_err(|e| e.kind()).err(),
        Some(std::io::ErrorKind::WouldBlock),
        "a datagram arrived"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn no_later_provider_papers_over_an_attack() {
    let sandbox = Sandbox::new();
    let toml = chain(&sandbox);
    for (attack, expected) in ATTACKS {
        let resolver = resolver(&sandbox, &toml).await;
        // The config provider (and pass-through) behind the hostile one know the
        // service, but a failure ahead of them is the answer: one line naming it.
        let query = match *attack {
            // The attack's port is not open here: the grant check fails before any
            // connection all the same.
            "http" | "tcp-connect" | "udp-send" => format!("http://{attack}:1"),
            _ => format!("http://{attack}"),
        };
        let err = resolver.resolve(&query).await.unwrap_err().to_string();
        assert!(err.contains(expected), "{attack}: {err}");
        assert!(!err.contains('\n'), "{attack}: {err:?}");
        // A query the hostile provider answers cleanly (it has nothing) goes on down
        // the chain: a failure holds back only the query that failed.
        let set = resolver.resolve("http://benign").await.unwrap();
        assert_eq!(set.provider(), Some("pass-through"), "{attack}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn noisy_and_slow_but_legal_providers_work() {
    let sandbox = Sandbox::new();
    let resolver = resolver(&sandbox, &alone(LIMITS)).await;
    // A megabyte of stderr: never a failure (only its last 16 KiB are kept:
    // `limits.rs` `stderr_keeps_the_tail`).
    assert_eq!(
        strings(&resolver.resolve("stderr").await.unwrap()),
        ["10.9.0.1:80"]
    );
    // 20 000 log lines: never a failure (the first thousand are logged, the rest
    // dropped: `a_log_flood_is_cut_at_a_thousand_lines_per_call`).
    assert_eq!(
        strings(&resolver.resolve("log-flood").await.unwrap()),
        ["10.9.0.2:80"]
    );
    // 300 ms of work under a 500 ms limit.
    assert_eq!(strings(&resolver.resolve("slow").await.unwrap()), ["10.9.0.3:80"]);
    // A megabyte error message is cut down.
    let err = resolver.resolve("long-error").await.unwrap_err().to_string();
    assert!(err.len() < 5000 && err.ends_with('…'), "{} bytes", err.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_spinning_provider_does_not_stall_other_resolves() {
    // One runtime thread: a guest that never yielded would block every other task.
    let sandbox = Sandbox::new();
    let resolver = resolver(&sandbox, &chain(&sandbox)).await;
    let spinning = Arc::new(AtomicBool::new(true));
    let attack = {
        let (resolver, spinning) = (resolver.clone(), spinning.clone());
        tokio::spawn(async move {
            let set = resolver.resolve("http://loop").await;
            spinning.store(false, Ordering::SeqCst);
            set
        })
    };
    let done_meanwhile = Arc::new(AtomicUsize::new(0));
    let mut n = 0;
    while spinning.load(Ordering::SeqCst) {
        n += 1;
        // Uncached: each goes through the hostile provider (empty) to pass-through.
        let set = resolver.resolve(&format!("steady-{n}:8080")).await.unwrap();
        assert_eq!(strings(&set), [format!("steady-{n}:8080")]);
        if spinning.load(Ordering::SeqCst) {
            done_meanwhile.fetch_add(1, Ordering::SeqCst);
        }
    }
    // The loop ran into its deadline, and that is the answer: the config provider
    // behind it does not stand in.
    let err = attack.await.unwrap().unwrap_err().to_string();
    assert!(
        err.contains("provider 'hostile': exceeded its time limit"),
        "{err}"
    );
    assert!(
        done_meanwhile.load(Ordering::SeqCst) >= 3,
        "only {} resolves completed while a provider spun",
        done_meanwhile.load(Ordering::SeqCst)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_provider_that_keeps_faulting_is_quarantined_then_retried() {
    let sandbox = Sandbox::new();
    let resolver = resolver(&sandbox, &alone(LIMITS)).await;
    for _ in 0..3 {
        let err = resolver.resolve("panic").await.unwrap_err().to_string();
        assert!(err.contains("trapped"), "{err}");
    }
    // Quarantined: not even called (the answer comes at once, and says why).
    let err = resolver.resolve("fine").await.unwrap_err().to_string();
    assert!(
        err.contains("provider 'hostile': quarantined: 3 faults in a row"),
        "{err}"
    );
    let status = resolver.provider_status();
    assert_eq!(status[0].name, "hostile");
    assert_eq!(status[0].faults, 3);
    assert!(status[0].quarantined_for.is_some(), "{status:?}");
    // After the first quarantine (1 s), it is called again, and a success clears it.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(strings(&resolver.resolve("slow").await.unwrap()), ["10.9.0.3:80"]);
    let status = resolver.provider_status();
    assert_eq!((status[0].faults_in_a_row, status[0].quarantined_for), (0, None));

    // A provider that traps only sometimes: every other call fails, the rest answer;
    // it never reaches three in a row.
    let resolver = self::resolver(&sandbox, &alone(LIMITS)).await;
    let mut answered = 0;
    for i in 0..6 {
        // Distinct queries, so none is served from the cache.
        match resolver.resolve(&format!("flaky:{}", 1000 + i)).await {
            Ok(set) => {
                assert_eq!(strings(&set), ["10.9.0.4:80"]);
                answered += 1;
            }
            Err(e) => assert!(
                e.to_string().contains("trapped: wasm trap: wasm `unreachable`"),
                "{e}"
            ),
        }
    }
    assert_eq!(answered, 3);
    assert!(resolver.provider_status()[0].quarantined_for.is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn own_errors_are_not_faults_but_refused_answers_are() {
    let sandbox = Sandbox::new();
    let resolver = resolver(&sandbox, &alone(LIMITS)).await;
    let query = |text: &str| text.parse::<wasd::Query>().unwrap();
    // A provider's own error (here `denied`) is an answer, not a fault: five in a row
    // neither count nor quarantine it.
    for _ in 0..5 {
        let err = resolver
            .resolve_uncached(&query("env"))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("provider 'hostile': capability denied"), "{err}");
    }
    let status = resolver.provider_status();
    assert_eq!(
        (status[0].faults, status[0].quarantined_for),
        (0, None),
        "{status:?}"
    );

    // An answer the host refuses is a fault like a trap: three in a row quarantine it.
    for _ in 0..3 {
        let err = resolver
            .resolve_uncached(&query("long"))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("provider 'hostile': answer refused"), "{err}");
    }
    let err = resolver
        .resolve_uncached(&query("count"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("provider 'hostile': quarantined: 3 faults in a row"),
        "{err}"
    );
    assert_eq!(resolver.provider_status()[0].faults, 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pinned_module_must_match_its_sha256() {
    let sandbox = Sandbox::new();
    let bytes = std::fs::read(fixtures::FIXED_A).unwrap();
    let plugin = sandbox.write("plugins/fixed.wasm", &bytes);
    let pin =
        |hex: &str| format!("pass-through = false\n[[provider]]\nname = \"fixed\"\nsha256 = \"{hex}\"\n");
    let actual = sha256_hex(&bytes);
    let resolver = resolver(&sandbox, &pin(&actual)).await;
    assert_eq!(
        strings(&resolver.resolve("fixed").await.unwrap()),
        ["http://10.1.0.1:80"]
    );

    // Another module dropped in its place is refused; the pinned one keeps serving.
    std::fs::write(&plugin, std::fs::read(fixtures::FIXED_B).unwrap()).unwrap();
    let report = resolver.reload().await;
    assert_eq!(report.errors.len(), 1, "{report:?}");
    assert!(
        report.errors[0].reason.contains("refused: its sha256 is"),
        "{report:?}"
    );
    assert!(
        report.errors[0]
            .reason
            .contains(&format!("the config pins {actual}")),
        "{report:?}"
    );
    assert_eq!(
        strings(&resolver.resolve("http://fixed").await.unwrap()),
        ["http://10.1.0.1:80"]
    );

    // At start, a mismatch stops the host from loading.
    let err = sandbox
        .resolver(&pin(&"0".repeat(64)))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("provider 'fixed'") && err.contains("refused: its sha256 is"),
        "{err}"
    );
    let err = sandbox.resolver(&pin("abc")).await.err().unwrap().to_string();
    assert!(err.contains("sha256 must be 64 hexadecimal digits"), "{err}");
}

fn sha256_hex(bytes: &[u8]) -> String {
    let out = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(bytes)?;
            child.wait_with_output()
        })
        .unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

/// A panic message is the guest's text: it reaches the caller with its control
/// characters escaped, so it can neither clear the operator's screen nor forge a line,
/// in the library's error and on the CLI's stderr.
#[test]
fn a_panic_message_cannot_drive_the_terminal() {
    let sandbox = Sandbox::new();
    sandbox.write("wasd.toml", alone(LIMITS));
    wasd_tests::runtime().block_on(async {
        let resolver = resolver(&sandbox, &alone(LIMITS)).await;
        let err = resolver.resolve("panic-escape").await.unwrap_err().to_string();
        assert!(!err.chars().any(char::is_control), "{err:?}");
        assert!(err.contains(r"\u{1b}[2J\u{1b}[Hcleared\rforged"), "{err}");
    });
    let out = run(sandbox
        .wasd()
        .args(["resolve", "panic-escape", "--config", "wasd.toml"]));
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert_eq!(out.stderr.lines().count(), 1, "{:?}", out.stderr);
    assert!(
        !out.stderr.trim_end().chars().any(char::is_control),
        "{:?}",
        out.stderr
    );
    assert!(out.stderr.contains("cleared"), "{}", out.stderr);
}

/// A provider's log lines reach the host's log, the first thousand of one call, then
/// one line saying the rest are dropped (through the CLI, whose log goes to stderr).
#[test]
fn a_log_flood_is_cut_at_a_thousand_lines_per_call() {
    let sandbox = Sandbox::new();
    sandbox.write("wasd.toml", alone(LIMITS));
    let out = run(sandbox
        .wasd()
        .args(["resolve", "log-flood", "--config", "wasd.toml"])
        .env("WASD_LOG", "wasd_sandbox=info"));
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.stdout.trim(), "10.9.0.2:80");
    let flood: Vec<&str> = out.stderr.lines().filter(|l| l.contains("flood line")).collect();
    assert_eq!(flood.len(), 1000, "{} flood lines", flood.len());
    assert!(flood[0].contains("flood line 0 "), "{}", flood[0]);
    assert!(flood[999].contains("flood line 999 "), "{}", flood[999]);
    let dropped = out
        .stderr
        .lines()
        .filter(|l| l.contains("more than 1000 log lines in one call"))
        .count();
    assert_eq!(dropped, 1, "{}", out.stderr.len());
}

#[test]
fn bad_input_on_the_command_line_is_an_error_not_a_crash() {
    let sandbox = Sandbox::new();
    // Not UTF-8.
    use std::os::unix::ffi::OsStrExt;
    let out = run(sandbox
        .wasd()
        .arg("resolve")
        .arg(std::ffi::OsStr::from_bytes(b"bad\xff\xfe")));
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("invalid UTF-8"), "{}", out.stderr);
    // Huge.
    let out = run(sandbox.wasd().args(["resolve", &"a".repeat(100_000)]));
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("longer than 2048 bytes"), "{}", out.stderr);
    // A config file that is not UTF-8, and one that is huge garbage.
    sandbox.write("bin.toml", b"\xff\xfe\x00garbage");
    let out = run(sandbox.wasd().args(["resolve", "x", "--config", "bin.toml"]));
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("bin.toml"), "{}", out.stderr);
    sandbox.write("big.toml", "[[[".repeat(1 << 20));
    let out = run(sandbox.wasd().args(["resolve", "x", "--config", "big.toml"]));
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("big.toml:1:"), "{}", out.stderr);
    // Environment variables that are not UTF-8 are ignored, not fatal.
    let out = run(sandbox
        .wasd()
        .args(["resolve", "http://catalog"])
        .env(
            "services__catalog__http__0",
            std::ffi::OsStr::from_bytes(b"http://\xff:80"),
        )
        .env("services__catalog__http__1", "http://10.0.0.1:80"));
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.stdout.trim(), "http://10.0.0.1:80");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_table_past_the_limit_is_refused_when_the_instance_is_made() {
    // big-table's function table starts at more than 200 000 elements (its build.rs);
    // the host allows 100 000. It would answer every service if it ran. The host
    // makes an instance to configure it as it loads, so the load is refused.
    let sandbox = Sandbox::new();
    let toml = format!(
        "pass-through = true\n[[provider]]\nname = \"big-table\"\nmodule = \"{}\"\n",
        fixtures::BIG_TABLE
    );
    let err = sandbox.resolver(&toml).await.err().expect("refused").to_string();
    assert!(
        err.contains("provider 'big-table'") && err.contains("exceeded its table limit (100000 elements)"),
        "{err}"
    );
    assert!(!err.contains('\n'), "{err:?}");
}

/// The `calls` tag of the hostile provider's `count` and `fetch` answers: how many
/// calls the instance that answered has served.
fn calls(set: &wasd::EndpointSet) -> u64 {
    set.endpoints()[0]
        .metadata_value("calls")
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_instance_is_retired_after_100_000_calls() {
    let sandbox = Sandbox::new();
    let resolver = resolver(&sandbox, &alone(LIMITS)).await;
    let count: wasd::Query = "count".parse().unwrap();
    // One call at a time: always the same pooled instance, until it has served its
    // 100 000 calls.
    for call in 1..=100_000u64 {
        let set = resolver.resolve_uncached(&count).await.unwrap();
        assert_eq!(calls(&set), call);
    }
    // Then a fresh one, configured again.
    assert_eq!(calls(&resolver.resolve_uncached(&count).await.unwrap()), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_instance_is_retired_after_1000_http_requests() {
    use std::io::{Read, Write};
    // A keep-alive HTTP/1.1 server that counts the requests it answers.
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    let requests = Arc::new(AtomicUsize::new(0));
    {
        let requests = requests.clone();
        std::thread::spawn(move || {
            for stream in server.incoming() {
                let (mut stream, requests) = (stream.unwrap(), requests.clone());
                std::thread::spawn(move || {
                    let mut buffer = Vec::new();
                    let mut chunk = [0u8; 1024];
                    loop {
                        while !buffer.windows(4).any(|w| w == b"\r\n\r\n") {
                            match stream.read(&mut chunk) {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                            }
                        }
                        buffer.clear();
                        requests.fetch_add(1, Ordering::SeqCst);
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if stream.write_all(answer).is_err() {
                            return;
                        }
                    }
                });
            }
        });
    }
    let sandbox = Sandbox::new();
    let toml = alone(LIMITS).replace(
        "limits = {",
        &format!("grants = {{ http = [\"http://127.0.0.1:{port}\"] }}\nlimits = {{"),
    );
    let resolver = resolver(&sandbox, &toml).await;
    let fetch: wasd::Query = format!("fetch:{port}").parse().unwrap();
    for call in 1..=1000u64 {
        let set = resolver.resolve_uncached(&fetch).await.unwrap();
        assert_eq!(calls(&set), call);
    }
    // Its 1 000 requests sent, the instance is replaced: the next call is a fresh
    // instance's first.
    assert_eq!(calls(&resolver.resolve_uncached(&fetch).await.unwrap()), 1);
    assert_eq!(requests.load(Ordering::SeqCst), 1001);
}

#[test]
fn guest_stdout_and_stderr_never_reach_the_operator() {
    // At the most verbose log level, a guest's own stdout and stderr (a megabyte of
    // it) stay out of the CLI's output: its answer is the only stdout, and nothing the
    // guest wrote appears on stderr. Only `wasd:provider/log` lines are logged.
    let sandbox = Sandbox::new();
    // A generous time limit: at trace level every one of the guest's writes is logged
    // (thousands of lines), which under a loaded CI machine took past 500 ms once. What
    // is tested here is where the output goes, not how long it takes.
    sandbox.write(
        "wasd.toml",
        alone(&LIMITS.replace(r#"timeout = "500ms""#, r#"timeout = "10s""#)),
    );
    for (attack, answer, written) in [
        ("stdout", "10.9.0.5:80", "hostile-stdout"),
        ("stderr", "10.9.0.1:80", "xxxxxxxxxxxxxxxx"),
    ] {
        let out = run(sandbox
            .wasd()
            .args(["resolve", attack, "--config", "wasd.toml"])
            .env("WASD_LOG", "trace"));
        assert_eq!(out.code, 0, "{attack}: {}", out.stderr);
        assert_eq!(out.stdout, format!("{answer}\n"), "{attack}");
        assert!(
            !out.stderr.contains(written),
            "{attack}: the guest's output reached stderr"
        );
        // Trace logging is on: the run did log (so the absence above means something).
        assert!(out.stderr.lines().count() > 10, "{attack}: {}", out.stderr);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn time_blocked_in_an_http_call_counts_toward_the_time_limit() {
    // A server that accepts and never answers; the guest's own HTTP timeout is 2 s,
    // its limit 500 ms. Unlike DNS (exempt, see dns.rs), time waiting on HTTP is the
    // provider's: the call ends at its limit, not at the guest's timeout.
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    let sandbox = Sandbox::new();
    let toml = alone(LIMITS).replace(
        "limits = {",
        &format!("grants = {{ http = [\"http://127.0.0.1:{port}\"] }}\nlimits = {{"),
    );
    let resolver = resolver(&sandbox, &toml).await;
    let started = std::time::Instant::now();
    let err = resolver
        .resolve(&format!("fetch:{port}"))
        .await
        .unwrap_err()
        .to_string();
    let took = started.elapsed();
    assert!(
        err.contains("provider 'hostile': exceeded its time limit (500 ms per call)"),
        "{err}"
    );
    assert!(
        (Duration::from_millis(450)..Duration::from_millis(1500)).contains(&took),
        "ended after {took:?}"
    );
    drop(server);
}

/// A TCP echo server on 127.0.0.1: answers each line with itself, and counts the
/// connections it accepted. Stops with the test process.
fn echo_server() -> (u16, Arc<AtomicUsize>) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            counter.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                    let _ = (&stream).write_all(line.as_bytes());
                    line.clear();
                }
            });
        }
    });
    (port, accepted)
}

/// `grants.tcp` opens exactly what it names: connections to the granted address (or
/// to what a granted name resolves to, on its port), and nothing else of wasi:sockets.
#[tokio::test(flavor = "multi_thread")]
async fn a_tcp_grant_lets_through_only_its_own_addresses() {
    let (granted, accepted) = echo_server();
    let (other, other_accepted) = echo_server();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp_port = udp.local_addr().unwrap().port();
    let sandbox = Sandbox::new();
    let toml = |grant: &str| format!("{}grants = {{ tcp = [\"{grant}\"] }}\n", alone(LIMITS));

    // By address.
    let by_address = resolver(&sandbox, &toml(&format!("127.0.0.1:{granted}"))).await;
    let set = by_address.resolve(&format!("tcp-echo:{granted}")).await.unwrap();
    assert_eq!(set.endpoints()[0].metadata_value("echo"), Some("wasd-ping"));
    let denials = [
        // Another port of the same host.
        (format!("tcp-connect:{other}"), "tcp connect: Permission denied"),
        // Listening, on a given address or after binding the unspecified one.
        ("tcp-listen".to_owned(), "tcp listen: Permission denied"),
        ("tcp-listen-any".to_owned(), "tcp listen: Permission denied"),
        (format!("udp-send:{udp_port}"), "udp send: Permission denied"),
        // No name is granted, so no lookup at all.
        (
            "name-lookup".to_owned(),
            "looking up localhost: failed to lookup address information",
        ),
        // Sixteen connections in one call, not the seventeenth.
        (
            format!("tcp-many:{granted}"),
            "tcp connect #17: Permission denied",
        ),
    ];
    for (query, expected) in &denials {
        let err = by_address.resolve(query).await.unwrap_err().to_string();
        assert!(
            err.contains(expected) && !err.contains("leaked"),
            "{query}: {err}"
        );
    }
    // The cap is per call: the next call connects again.
    assert!(by_address.resolve(&format!("tcp-echo:{granted}")).await.is_ok());

    // By name: the host resolves `localhost` and lets the guest connect to what it
    // resolves to, on the granted port; the guest may look that name up and no other.
    let by_name = resolver(&sandbox, &toml(&format!("localhost:{granted}"))).await;
    let set = by_name
        .resolve(&format!("tcp-echo-name:{granted}"))
        .await
        .unwrap();
    assert_eq!(set.endpoints()[0].metadata_value("echo"), Some("wasd-ping"));
    let err = by_name
        .resolve(&format!("tcp-echo-name:{other}"))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("tcp echo: Permission denied"), "{err}");
    // Refused by the grant (a resolver's answer would be "does not resolve").
    let err = by_name
        .resolve("name-lookup-other")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("Non-recoverable error"), "{err}");

    assert_eq!(
        other_accepted.load(Ordering::SeqCst),
        0,
        "a connection reached the port not granted"
    );
    // The echo by address, the sixteen of tcp-many, the echo after it, and the one by
    // name (the server may still be accepting the closed ones of tcp-many).
    let expected = 1 + 16 + 1 + 1;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while accepted.load(Ordering::SeqCst) < expected && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(accepted.load(Ordering::SeqCst), expected);
    udp.set_nonblocking(true).unwrap();
    assert!(udp.recv_from(&mut [0u8; 64]).is_err(), "a datagram arrived");
}

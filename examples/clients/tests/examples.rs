//! The example clients run as a user runs them: against their own instances,
//! discovered from an appsettings.json and from etcd registrations (a real etcd).

use std::process::Command;

use wasd_tests::{EtcdServer, run};

/// Run an example binary; its stdout.
fn example(bin: &str, args: &[&str]) -> String {
    let path = match bin {
        "http-client" => env!("CARGO_BIN_EXE_http-client"),
        _ => env!("CARGO_BIN_EXE_grpc-client"),
    };
    let out = run(Command::new(path).args(args));
    assert!(
        out.code == 0,
        "{bin} {args:?} failed:\n{}\n{}",
        out.stdout,
        out.stderr
    );
    out.stdout
}

/// The `answered: NAME=N ...` lines, before and after the removal.
fn tallies(stdout: &str) -> Vec<&str> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("answered: "))
        .collect()
}

#[test]
fn http_client_balances_and_follows_config() {
    let stdout = example("http-client", &[]);
    assert_eq!(
        tallies(&stdout),
        ["catalog-1=2 catalog-2=2 catalog-3=2", "catalog-1=3 catalog-2=3"],
        "{stdout}"
    );
    assert!(
        stdout.contains("GET https+http://catalog/items -> http://127.0.0.1:"),
        "{stdout}"
    );
    let pick_first = example("http-client", &["--strategy", "pick-first"]);
    assert_eq!(
        tallies(&pick_first),
        ["catalog-1=6", "catalog-1=6"],
        "{pick_first}"
    );
}

#[test]
fn http_client_through_etcd_registration() {
    let etcd = EtcdServer::start();
    let stdout = example("http-client", &["--etcd", &etcd.url()]);
    assert_eq!(stdout.matches("registered catalog/").count(), 3, "{stdout}");
    let tallies = tallies(&stdout);
    // Each instance twice, in whatever order etcd lists them; then without the third.
    assert_eq!(tallies[0], "catalog-1=2 catalog-2=2 catalog-3=2", "{stdout}");
    assert_eq!(tallies[1], "catalog-1=3 catalog-2=3", "{stdout}");
    assert!(
        etcd.get_prefix("/microservices/catalog/").is_empty(),
        "deregistered on exit"
    );
}

#[test]
fn grpc_client_balances_and_follows_config_and_etcd() {
    let check = |stdout: &str| {
        let tallies = tallies(stdout);
        assert_eq!(tallies.len(), 2, "{stdout}");
        let total = |t: &str| -> usize {
            t.split(' ')
                .map(|p| p.split('=').nth(1).unwrap().parse::<usize>().unwrap())
                .sum()
        };
        assert_eq!(total(tallies[0]), 12, "{stdout}");
        assert_eq!(total(tallies[1]), 12, "{stdout}");
        assert!(!tallies[1].contains("greeter-3"), "{stdout}");
    };
    check(&example("grpc-client", &[]));
    // wasd's own balancing under the default policy: round-robin, exactly.
    let stdout = example("grpc-client", &["--balanced"]);
    check(&stdout);
    assert_eq!(
        tallies(&stdout),
        ["greeter-1=4 greeter-2=4 greeter-3=4", "greeter-1=6 greeter-2=6"],
        "{stdout}"
    );
    let etcd = EtcdServer::start();
    let stdout = example("grpc-client", &["--etcd", &etcd.url()]);
    assert_eq!(stdout.matches("registered greeter/").count(), 3, "{stdout}");
    check(&stdout);
}

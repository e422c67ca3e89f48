//! Every stored fuzz corpus input, replayed through its target's checks on the stable
//! toolchain (`fuzz/src/checks.rs`, shared with the libFuzzer targets), so a parser
//! change that crashes or breaks an invariant on a stored input fails CI, not only a
//! nightly fuzzing run.

use std::path::PathBuf;

#[path = "../../fuzz/src/checks.rs"]
mod checks;

/// Run `check` on every file of `fuzz/corpus/{target}`; the number of inputs. A failing
/// input is named (its file) before the panic goes on.
fn replay(target: &str, check: impl Fn(&[u8])) -> usize {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .collect();
    inputs.sort();
    for input in &inputs {
        let bytes = std::fs::read(input).unwrap();
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&bytes))).is_err() {
            panic!("fuzz target {target} fails on {}", input.display());
        }
    }
    inputs.len()
}

/// libFuzzer's `&str` targets only see inputs that are UTF-8.
fn text(check: fn(&str)) -> impl Fn(&[u8]) {
    move |bytes| {
        if let Ok(text) = std::str::from_utf8(bytes) {
            check(text);
        }
    }
}

#[test]
fn query_corpus() {
    assert!(replay("query", text(checks::query)) > 100);
}

#[test]
fn config_corpus() {
    assert!(replay("config", text(checks::config)) > 100);
}

#[test]
fn etcd_instance_corpus() {
    assert!(replay("etcd_instance", checks::etcd_instance) > 100);
}

#[test]
fn etcd_range_corpus() {
    assert!(replay("etcd_range", checks::etcd_range) > 100);
}

#[test]
fn etcd_watch_corpus() {
    assert!(replay("etcd_watch", checks::etcd_watch) > 100);
}

#[test]
fn zookeeper_packet_corpus() {
    assert!(replay("zookeeper_packet", checks::zookeeper_packet) > 100);
}

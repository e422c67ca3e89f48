//! What each fuzz target checks, one function per target. The targets in
//! `fuzz_targets/` call these under libFuzzer (nightly, `cargo fuzz run`); the stable
//! test `tests/tests/fuzz_replay.rs` replays every stored corpus input through them, so
//! a parser change that fails on a stored input fails CI.
//!
//! Included by `#[path]`; it compiles the etcd and zookeeper providers' parsers in the
//! same way (the providers are cdylibs), by paths relative to this file.

#[allow(dead_code)]
#[path = "../../providers/etcd/src/gateway.rs"]
mod gateway;
#[allow(dead_code)]
#[path = "../../providers/registry/src/instance.rs"]
mod instance;
#[allow(dead_code)]
#[path = "../../providers/zookeeper/src/jute.rs"]
mod jute;

/// `query`: a query text is rejected in one line, or parsed into something that parses
/// again the same.
pub fn query(input: &str) {
    match wasd::Query::parse(input) {
        Ok(query) => {
            assert!(!query.service().is_empty());
            // The service keeps its case (registries key names verbatim); endpoint
            // names and schemes are lower-cased.
            if let Some(name) = query.endpoint_name() {
                assert_eq!(name, name.to_ascii_lowercase());
            }
            assert!(
                query
                    .schemes()
                    .iter()
                    .all(|s| !s.is_empty() && *s == s.to_ascii_lowercase())
            );
            let again = wasd::Query::parse(query.as_str()).expect("an accepted query parses again");
            assert_eq!(again, query);
        }
        Err(e) => {
            let message = e.to_string();
            assert!(message.starts_with("invalid query"), "{message}");
            assert!(!message.contains('\n'), "one line: {message}");
        }
    }
}

/// `config`: any TOML is a config or an error with a message.
pub fn config(input: &str) {
    if let Err(e) = wasd::Config::from_toml(input, std::path::Path::new("/srv")) {
        assert!(!e.message.is_empty());
    }
}

/// `etcd_instance`: a Kratos instance value parses into endpoints with a host and a
/// scheme, and what we write we read back.
pub fn etcd_instance(value: &[u8]) {
    if let Ok(found) = instance::Instance::parse(value) {
        for endpoint in found.endpoints().into_iter().flatten() {
            assert!(!endpoint.host.is_empty());
            assert!(endpoint.scheme.is_some());
        }
        assert_eq!(instance::Instance::parse(&found.to_json()).unwrap(), found);
    }
    if let Ok(text) = std::str::from_utf8(value) {
        let _ = instance::parse_endpoint(text);
    }
}

/// `etcd_range`: a range response body, and the instances in it.
pub fn etcd_range(body: &[u8]) {
    if let Ok(range) = gateway::parse_range(body) {
        for kv in range.kvs {
            if let Ok(found) = instance::Instance::parse(&kv.value) {
                let _ = found.endpoints();
            }
        }
    }
}

/// `etcd_watch`: a watch, keep-alive or lease-grant line, and the error message made
/// from any body (bounded).
pub fn etcd_watch(line: &[u8]) {
    let _ = gateway::parse_watch_line(line);
    let _ = gateway::parse_keep_alive(line);
    let _ = gateway::parse_lease_grant(line);
    let message = gateway::error_message(line);
    assert!(message.chars().count() <= 303);
}

/// `zookeeper_packet`: any packet a ZooKeeper server (or something posing as one) may
/// send parses into records or an error, never a panic, and a list never holds more
/// entries than the bytes could encode.
pub fn zookeeper_packet(payload: &[u8]) {
    let _ = jute::parse_connect_response(payload);
    let Ok((_, record)) = jute::parse_reply(payload) else {
        return;
    };
    if let Ok((children, _)) = jute::parse_children(record) {
        assert!(children.len() <= record.len() / 4);
        // What we would ask for next: the same names, encoded again, read back.
        let mut again = jute::Packet::bare().int(children.len() as i32);
        for child in &children {
            again = again.string(child);
        }
        let mut bytes = again.finish()[4..].to_vec();
        bytes.extend_from_slice(&[0; 68]);
        assert_eq!(jute::parse_children(&bytes).unwrap().0, children);
    }
    if let Ok((data, _)) = jute::parse_data(record) {
        assert!(data.len() <= record.len());
    }
    let _ = jute::parse_stat(record);
    let _ = jute::parse_watcher_event(record);
}

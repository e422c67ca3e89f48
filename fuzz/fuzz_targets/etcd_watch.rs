//! The etcd provider's parsers for streamed lines: watch, keep-alive, lease grants and
//! gateway errors.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../providers/etcd/src/gateway.rs"]
mod gateway;

fuzz_target!(|line: &[u8]| {
    let _ = gateway::parse_watch_line(line);
    let _ = gateway::parse_keep_alive(line);
    let _ = gateway::parse_lease_grant(line);
    let message = gateway::error_message(line);
    assert!(message.chars().count() <= 303);
});

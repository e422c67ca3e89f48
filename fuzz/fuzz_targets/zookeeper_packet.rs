//! Packets as a ZooKeeper server (or anything listening where one should) may send
//! them: connect responses, reply headers and the records the provider reads.
#![no_main]

use libfuzzer_sys::fuzz_target;

// The checks live in one file shared with the stable corpus replay test.
#[allow(dead_code)]
#[path = "../src/checks.rs"]
mod checks;

fuzz_target!(|packet: &[u8]| checks::zookeeper_packet(packet));

//! The etcd provider's parsers for streamed lines: watch, keep-alive, lease grants and
//! gateway errors.
#![no_main]

use libfuzzer_sys::fuzz_target;

// The checks live in one file shared with the stable corpus replay test.
#[allow(dead_code)]
#[path = "../src/checks.rs"]
mod checks;

fuzz_target!(|line: &[u8]| checks::etcd_watch(line));

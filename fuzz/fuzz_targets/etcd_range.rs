//! The etcd provider's `/v3/kv/range` parser on arbitrary gateway answers, then the
//! instance parser on every value it decodes.
#![no_main]

use libfuzzer_sys::fuzz_target;

// The checks live in one file shared with the stable corpus replay test.
#[allow(dead_code)]
#[path = "../src/checks.rs"]
mod checks;

fuzz_target!(|body: &[u8]| checks::etcd_range(body));

//! Kratos ServiceInstance values and endpoint URLs as anyone may write them to etcd.
#![no_main]

use libfuzzer_sys::fuzz_target;

// The checks live in one file shared with the stable corpus replay test.
#[allow(dead_code)]
#[path = "../src/checks.rs"]
mod checks;

fuzz_target!(|value: &[u8]| checks::etcd_instance(value));

//! The host config parser: any text is a config or an error naming where it is wrong.
#![no_main]

use libfuzzer_sys::fuzz_target;

// The checks live in one file shared with the stable corpus replay test.
#[allow(dead_code)]
#[path = "../src/checks.rs"]
mod checks;

fuzz_target!(|input: &str| checks::config(input));

//! The query parser: any string is a query or a clear error; a query's parts obey the
//! parser's own rules, and re-parsing what it accepted gives the same query.
#![no_main]

use libfuzzer_sys::fuzz_target;

// The checks live in one file shared with the stable corpus replay test.
#[allow(dead_code)]
#[path = "../src/checks.rs"]
mod checks;

fuzz_target!(|input: &str| checks::query(input));

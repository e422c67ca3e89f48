//! Kratos ServiceInstance values and endpoint URLs as anyone may write them to etcd.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../providers/etcd/src/instance.rs"]
mod instance;

fuzz_target!(|value: &[u8]| {
    if let Ok(found) = instance::Instance::parse(value) {
        for endpoint in found.endpoints().into_iter().flatten() {
            assert!(!endpoint.host.is_empty());
            assert!(endpoint.scheme.is_some());
        }
        // What we write, we read back.
        assert_eq!(instance::Instance::parse(&found.to_json()).unwrap(), found);
    }
    if let Ok(text) = std::str::from_utf8(value) {
        let _ = instance::parse_endpoint(text);
    }
});

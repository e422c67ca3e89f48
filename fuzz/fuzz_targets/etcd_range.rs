//! The etcd provider's `/v3/kv/range` parser on arbitrary gateway answers, then the
//! instance parser on every value it decodes.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../providers/etcd/src/gateway.rs"]
mod gateway;
#[allow(dead_code)]
#[path = "../../providers/etcd/src/instance.rs"]
mod instance;

fuzz_target!(|body: &[u8]| {
    if let Ok(range) = gateway::parse_range(body) {
        for kv in range.kvs {
            if let Ok(found) = instance::Instance::parse(&kv.value) {
                let _ = found.endpoints();
            }
        }
    }
});

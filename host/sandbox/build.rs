//! Builds the standard providers (`providers/`) for `wasm32-wasip2` into OUT_DIR, where
//! `src/builtin.rs` embeds them.

use std::path::Path;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).ancestors().nth(2).unwrap();
    for shared in ["wit", "sdk/src", "sdk/Cargo.toml"] {
        println!("cargo:rerun-if-changed={}", root.join(shared).display());
    }
    wasd_guest_build::build(
        &root.join("providers/Cargo.toml"),
        &[
            ("config", "wasd_provider_config"),
            ("dns-srv", "wasd_provider_dns_srv"),
            ("dns", "wasd_provider_dns"),
            ("etcd", "wasd_provider_etcd"),
            ("pass-through", "wasd_provider_pass_through"),
        ],
    );
}

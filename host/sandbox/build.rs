//! Builds the standard providers for `wasm32-wasip2` into OUT_DIR, where
//! `src/builtin.rs` embeds them: from `providers/` in the repository, or, in a
//! published crate, from the copy `scripts/package` staged in `guests/`.

use std::path::Path;

fn main() {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = here
        .ancestors()
        .nth(2)
        .expect("host/sandbox lives two folders down");
    let manifest = if root.join("providers/Cargo.toml").is_file() {
        for shared in ["wit", "sdk/src", "sdk/Cargo.toml"] {
            println!("cargo:rerun-if-changed={}", root.join(shared).display());
        }
        root.join("providers/Cargo.toml")
    } else {
        wasd_guest_build::unstage(&here.join("guests")).join("providers/Cargo.toml")
    };
    wasd_guest_build::build(
        &manifest,
        &[
            ("config", "wasd_provider_config"),
            ("dns-srv", "wasd_provider_dns_srv"),
            ("dns", "wasd_provider_dns"),
            ("etcd", "wasd_provider_etcd"),
            ("pass-through", "wasd_provider_pass_through"),
            ("zookeeper", "wasd_provider_zookeeper"),
        ],
    );
}

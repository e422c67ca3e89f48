//! Builds the standard providers (`providers/`) for `wasm32-wasip2` and puts the
//! components in OUT_DIR, where `src/builtin.rs` embeds them. They are never committed.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Provider crates and the names the host knows them by.
const PROVIDERS: &[(&str, &str)] = &[
    ("config", "wasd_provider_config"),
    ("pass-through", "wasd_provider_pass_through"),
];

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().unwrap().to_path_buf();
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap());

    for watched in ["wit", "sdk/src", "sdk/Cargo.toml", "providers"] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");

    // One fixed target dir for all host profiles (dev, test, clippy, bench), so the
    // guests build once; cargo's own lock serialises concurrent builds.
    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("wasm-guests");

    build_guest_workspace(&root.join("providers/Cargo.toml"), &target_dir);
    let built = target_dir.join("wasm32-wasip2/release");
    for (name, artifact) in PROVIDERS {
        let from = built.join(format!("{artifact}.wasm"));
        let to = out_dir.join(format!("{name}.wasm"));
        std::fs::copy(&from, &to)
            .unwrap_or_else(|e| panic!("copying {} to {}: {e}", from.display(), to.display()));
    }
}

fn build_guest_workspace(manifest: &Path, target_dir: &Path) {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--release",
        "--target",
        "wasm32-wasip2",
        "--manifest-path",
    ])
    .arg(manifest)
    .arg("--target-dir")
    .arg(target_dir);
    // What cargo set up for the host build must not leak into the guest build:
    // flags for the host target, clippy's wrapper, the outer target dir.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_MANIFEST_DIR",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        cmd.env_remove(var);
    }
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("running cargo for the wasm guests: {e}"));
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let hint = if stderr.contains("wasm32-wasip2") && stderr.contains("target may not be installed") {
            "\n\nThe wasm32-wasip2 target is missing: run `rustup target add wasm32-wasip2`.\n"
        } else {
            ""
        };
        panic!(
            "building the providers in {} for wasm32-wasip2 failed:\n{stderr}{hint}",
            manifest.display()
        );
    }
}

//! Used by build scripts (the host's standard providers, the tests' fixtures) to
//! compile a workspace of guest crates for `wasm32-wasip2`. Built components are
//! copied into OUT_DIR; nothing built is ever committed.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Build the guest workspace at `manifest` (release, `wasm32-wasip2`) and copy each
/// `(name, artifact)` pair's `{artifact}.wasm` to `OUT_DIR/{name}.wasm`. Returns the
/// copied paths, in order. Panics with the compiler's output on failure.
pub fn build(manifest: &Path, components: &[(&str, &str)]) -> Vec<PathBuf> {
    let manifest_dir = manifest.parent().expect("a manifest lives in a folder");
    println!("cargo:rerun-if-changed={}", manifest_dir.display());
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("called from a build script"));

    // One fixed target dir for every profile of the outer build (dev, test, clippy,
    // bench), so guests compile once; cargo's lock serialises concurrent builds.
    // Outside any workspace (a crate built from the registry), OUT_DIR.
    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .or_else(|| workspace_root().map(|root| root.join("target")))
        .unwrap_or_else(|| out_dir.clone())
        .join("wasm-guests");

    // WASD_GUEST_TOOLCHAIN builds the guests with another rustup toolchain than the
    // outer build (the fuzz targets build with nightly, which may lack the target).
    println!("cargo:rerun-if-env-changed=WASD_GUEST_TOOLCHAIN");
    let mut cmd = match env::var("WASD_GUEST_TOOLCHAIN") {
        Ok(toolchain) if !toolchain.is_empty() => {
            let mut cmd = Command::new("rustup");
            cmd.args(["run", &toolchain, "cargo"]);
            for var in ["RUSTUP_TOOLCHAIN", "RUSTC", "RUSTDOC", "CARGO"] {
                cmd.env_remove(var);
            }
            cmd
        }
        _ => Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into())),
    };
    cmd.args([
        "build",
        "--release",
        "--target",
        "wasm32-wasip2",
        "--manifest-path",
    ])
    .arg(manifest)
    .arg("--target-dir")
    .arg(&target_dir);
    // What cargo set up for the outer build must not leak into the guest build:
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
            "building {} for wasm32-wasip2 failed:\n{stderr}{hint}",
            manifest.display()
        );
    }

    let built = target_dir.join("wasm32-wasip2/release");
    components
        .iter()
        .map(|(name, artifact)| {
            let from = built.join(format!("{artifact}.wasm"));
            let to = out_dir.join(format!("{name}.wasm"));
            std::fs::copy(&from, &to)
                .unwrap_or_else(|e| panic!("copying {} to {}: {e}", from.display(), to.display()));
            to
        })
        .collect()
}

/// The outer workspace's root: the nearest ancestor of the calling package with a
/// `[workspace]` Cargo.toml.
fn workspace_root() -> Option<PathBuf> {
    let start = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("called from a build script"));
    start
        .ancestors()
        .find(|dir| {
            std::fs::read_to_string(dir.join("Cargo.toml")).is_ok_and(|toml| toml.contains("[workspace]"))
        })
        .map(Path::to_path_buf)
}

/// Suffix of the manifests in a staged guest tree. `cargo package` leaves out any folder
/// holding a `Cargo.toml` (it is another package), so guest sources travel inside a
/// published crate with their manifests renamed (`scripts/package` stages them).
pub const STAGED_MANIFEST: &str = "Cargo.toml.in";

/// Copy a staged guest tree (see [`STAGED_MANIFEST`]) into `OUT_DIR/guests`, giving the
/// manifests their names back; the copy's root.
pub fn unstage(staged: &Path) -> PathBuf {
    println!("cargo:rerun-if-changed={}", staged.display());
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("called from a build script"));
    let root = out_dir.join("guests");
    copy_tree(staged, &root)
        .unwrap_or_else(|e| panic!("copying {} to {}: {e}", staged.display(), root.display()));
    root
}

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let name = entry.file_name();
        let target = if name == STAGED_MANIFEST {
            to.join("Cargo.toml")
        } else {
            to.join(&name)
        };
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

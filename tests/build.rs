//! Builds the test fixtures (`guests/`) for `wasm32-wasip2` and exposes their paths as
//! constants in `fixtures.rs`, so a test names a fixture by constant and a missing one
//! fails the build.

use std::path::Path;

fn main() {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    for shared in ["../wit", "../sdk/src"] {
        println!("cargo:rerun-if-changed={}", here.join(shared).display());
    }
    let fixtures = [
        ("sequence", "wasd_fixture_sequence"),
        ("fixed-a", "wasd_fixture_fixed_a"),
        ("fixed-b", "wasd_fixture_fixed_b"),
        ("hostile", "wasd_fixture_hostile"),
        ("big-table", "wasd_fixture_big_table"),
        ("not-a-provider", "wasd_fixture_not_a_provider"),
        ("wrong-version", "wasd_fixture_wrong_version"),
    ];
    let built = wasd_guest_build::build(&here.join("guests/Cargo.toml"), &fixtures);
    let mut consts = String::new();
    for ((name, _), path) in fixtures.iter().zip(&built) {
        consts.push_str(&format!(
            "/// The `{name}` fixture component.\npub const {}: &str = {:?};\n",
            name.to_uppercase().replace('-', "_"),
            path.display().to_string()
        ));
    }
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").unwrap());
    std::fs::write(out.join("fixtures.rs"), consts).unwrap();
}
